"""Hyperparameters chosen on validation documents, never on test ones."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import build_small, make_lm

from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.tune import TuneConfig, model_class, requests_for, run_tune, validation_documents
from lm_eval_ttt.tunerecord import GridRow, TuneRecord


@pytest.fixture(scope="module")
def tuned(tiny_lm, small_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    config = TuneConfig(method="ttt-nn", param="lr", grid=(1e-4, 3e-3, 3e-2), docs=3, out=out,
                        model_args={"pretrained": str(tiny_lm), "index": str(small_index), "k": 2, "max_length": 64,
                                    "max_neighbor_tokens": 64, "device": "cpu", "batch_size": 1, "seed": 1,
                                    "eval_at_k": "0:1",
                                    "neighbour_cache": str(out / "cache")})
    return config, run_tune(config, echo=lambda *a: None)


def test_tune_picks_the_lowest_validation_bits_per_byte_of_its_own_table(tuned, small_index):
    config, result = tuned
    rows = result.rows
    assert [r.value for r in rows] == [1e-4, 3e-3, 3e-2]
    assert result.value == min(rows, key=lambda r: r.bits_per_byte).value
    assert len({round(r.bits_per_byte, 6) for r in rows}) == 3  # the grid makes a difference
    assert all(r.steps > 0 and r.seconds > 0 for r in rows)
    for r in rows:  # the validation curve up to the tuned k (eval_at_k), its last point the row's value
        assert list(r.curve) == ["0", "1", "2"] and r.curve["2"] == pytest.approx(r.bits_per_byte, rel=1e-5)
    assert len({r.curve["0"] for r in rows}) == 1  # k=0 is the untrained model whatever the rate
    assert TuneRecord.read(config.out / "tune.json") == result  # the file is the record, whole
    assert json.loads((config.out / "tune.json").read_text())["chosen"] == result.value
    from index_server.index import open_index

    documents = validation_documents(open_index(str(small_index)), 3, 0, 300, 4000)
    assert tuple(d for d, _ in documents) == result.validation.ids
    for row in rows:  # every number equals a separate evaluation of that value
        lm = model_class("ttt-nn")(**{**config.model_args, "lr": row.value, "log_dir": str(config.out / "again")})
        lls = lm.loglikelihood_rolling(requests_for(documents), disable_tqdm=True)
        assert bits_per_byte(lls, utf8_bytes([t for _, t in documents])) == pytest.approx(row.bits_per_byte,
                                                                                         rel=1e-12)


def test_a_widened_grid_resumes_old_values_with_their_own_costs(tuned, tmp_path):
    """Re-running a tune with more values reuses the logged ones; their seconds were the wall
    time of the resume (~0 s), which also broke ties in favour of resumed values."""
    import shutil
    from dataclasses import replace

    config, result = tuned
    shutil.copytree(config.out / "logs", tmp_path / "logs")  # the earlier tune's logs, another tune.json
    again = run_tune(replace(config, grid=(1e-4, 3e-3), out=tmp_path), echo=lambda *a: None)
    assert all(r.seconds > 0 for r in result.rows)
    for old, new in zip(result.rows, again.rows):
        assert new.bits_per_byte == old.bits_per_byte and new.steps == old.steps
        assert new.seconds == old.seconds > 0


def test_validation_documents_never_retrieve_themselves(tuned):
    config, result = tuned
    logs = config.out / "logs"
    stems = {p.name.split(".rank")[0] for p in logs.glob("*.rank*.jsonl")}
    assert len(stems) == 3  # one log per grid value
    own = dict(enumerate(result.validation.ids))
    for stem in stems:
        for record in read_log(logs / stem).values():
            corpus_id = own[record["doc_id"]]
            assert corpus_id not in record["neighbour_ids"]
            assert corpus_id in record["excluded"]  # it was the nearest: excluded by id


def test_tune_never_opens_a_test_split_file(tiny_lm, default_corpus, tmp_path):
    """An audit hook sees every file the tune process opens: the test splits are not among them
    (an index over the first documents of the bundled index split, its test split beside it)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = (default_corpus / "stdlib_code.index.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (corpus / "stdlib_code.index.jsonl").write_text("".join(lines[:60]), encoding="utf-8")
    (corpus / "stdlib_code.test.jsonl").write_bytes((default_corpus / "stdlib_code.test.jsonl").read_bytes())
    index = build_small(corpus / "stdlib_code.index.jsonl", tmp_path / "index")
    script = f"""
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
from lm_eval_ttt.cli import main
code = main(["tune", "--method", "ttt-nn-interp", "--param", "lambda", "--grid", "0.1:0.3", "--docs", "2",
             "--pretrained", {str(tiny_lm)!r}, "--index", {str(index)!r}, "--k", "2", "--max-length", "64",
             "--out", {str(tmp_path / 'tune')!r}])
test_files = sorted({{p for p in opened if p.endswith(".test.jsonl")}})
print("TEST FILES OPENED:", test_files)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TEST FILES OPENED: []" in proc.stdout
    assert "chosen lambda=" in proc.stdout


def test_a_run_records_the_tuned_value_and_refuses_a_mismatch(tuned, tiny_lm, small_index, tmp_path):
    from lm_eval_ttt.model import TTTNNLM
    from lm_eval_ttt.settings import ModelArgumentError

    config, result = tuned
    path = config.out / "tune.json"
    args = dict(k=2, max_neighbor_tokens=64, tuned=str(path))
    lm = make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, lr=result.value, **args)
    info = lm.get_model_info()["ttt_nn"]["tuned"]
    assert (info["param"], info["value"], info["k"], info["source"]) == ("lr", result.value, 2, "tuned")
    assert tuple(info["validation"]["ids"]) == result.validation.ids and info["validation"]["count"] == 3
    assert info["describe"] == f"lr={result.value} tuned on 3 validation docs"
    other = next(v for v in config.grid if v != result.value)
    with pytest.raises(ModelArgumentError, match=f"chose lr={result.value} for ttt-nn, but this run is ttt-nn"):
        make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, lr=other, **args)


def test_a_run_at_another_k_than_the_tune_is_warned(tuned, tiny_lm, small_index, tmp_path):
    """A value chosen at one k need not hold at another (LoRA's rate got worse past k=5)."""
    from lm_eval_ttt.model import TTTNNLM

    config, result = tuned
    args = dict(max_neighbor_tokens=64, tuned=str(config.out / "tune.json"), lr=result.value)
    with pytest.warns(UserWarning, match=r"tuned at k=2; this run uses k=3"):
        make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, k=3, **args)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, k=2, **args)


def test_the_value_past_an_edge_of_the_grid():
    from lm_eval_ttt.tune import beyond_edge

    def rows(*values):
        return [GridRow(v, 1.0, 0, 0.0) for v in values]

    floats = rows(1e-4, 2e-4, 5e-4)
    assert beyond_edge(floats, floats[2]) == 1.25e-3 and beyond_edge(floats, floats[0]) == 5e-5
    assert beyond_edge(floats, floats[1]) is None
    ints = rows(32, 64, 128)
    assert beyond_edge(ints, ints[2]) == 256 and beyond_edge(ints, ints[0]) == 16
    assert beyond_edge(rows(0.0, 0.1), rows(0.0)[0]) == -0.1


def test_a_choice_on_the_edge_widens_the_grid(tuned, tmp_path, monkeypatch):
    """A validation curve whose minimum (3e-3) lies past the grid: --widen walks out until the
    choice is inside, or says it stopped on the edge."""
    import math
    from dataclasses import replace

    from lm_eval_ttt import tune

    def evaluate(config, value, documents):
        return GridRow(value, 1 + (math.log10(value) - math.log10(3e-3)) ** 2, 1, 1.0)

    monkeypatch.setattr(tune, "evaluate_value", evaluate)
    config, _ = tuned
    widened = run_tune(replace(config, grid=(1e-4, 3e-4), out=tmp_path / "a", widen=5), echo=lambda *a: None)
    assert widened.widened == (9e-4, 2.7e-3, 8.1e-3) and widened.value == 2.7e-3
    assert "edge" not in widened.reason
    stopped = run_tune(replace(config, grid=(1e-4, 3e-4), out=tmp_path / "b", widen=1), echo=lambda *a: None)
    assert stopped.widened == (9e-4,) and stopped.value == 9e-4 and "on the edge of the grid" in stopped.reason
    assert run_tune(replace(config, grid=(1e-4, 3e-4), out=tmp_path / "c"), echo=lambda *a: None).widened == ()


def test_validation_documents_can_come_from_a_held_out_split(tuned, default_corpus, tmp_path):
    """A corpus split by `ttt-index corpus` has a validation file outside the index: the tune
    draws its documents from it by the ttt_corpus task's seeded rule."""
    from dataclasses import replace

    from lm_eval_ttt.task_data import load_corpus

    config, _ = tuned
    split = tmp_path / "validation.jsonl"
    lines = (default_corpus / "python_docs.test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    split.write_text("".join(lines), encoding="utf-8")
    result = run_tune(replace(config, grid=(3e-3,), out=tmp_path / "tune", validation_file=split, docs=2,
                              min_chars=300, max_chars=4000), echo=lambda *a: None)
    texts = [json.loads(line)["text"] for line in lines]
    chosen = [texts[n - 1] for n in result.validation.ids]
    assert result.validation.file == str(split) and len(chosen) == 2
    assert all(300 <= len(t) <= 4000 for t in chosen)
    loaded = load_corpus(corpus_file=str(split), sample=2, seed=config.seed, min_chars=300, max_chars=4000)
    assert list(loaded["test"]["text"]) == chosen  # the same rule picks the same documents
    assert len(load_corpus(corpus_file=str(split))["test"]) == len(lines)


def test_widening_stops_at_the_bounds_of_the_parameter(tuned, tmp_path, monkeypatch):
    """Past lambda=0.6 the next value (1.2) is no mixing weight: the tune says so and stops."""
    from dataclasses import replace

    from lm_eval_ttt import tune

    monkeypatch.setattr(tune, "evaluate_value", lambda config, value, documents: GridRow(value, 1 - value, 0, 1.0))
    config, _ = tuned
    said = []
    result = run_tune(replace(config, method="ttt-nn-interp", param="lambda", grid=(0.3, 0.6), out=tmp_path,
                              widen=3), echo=said.append)
    assert result.widened == () and result.value == 0.6 and "on the edge" in result.reason
    assert any("lambda: must be < 1" in line for line in said)


def test_a_method_without_neighbours_is_tuned_on_the_index_the_tune_was_given(tiny_lm, small_index, tmp_path):
    """`ttt-nn tune --index X --method ttt-nn-dyneval`: the index only supplies the validation
    documents; dynamic evaluation retrieves nothing and must not be handed it."""
    config = TuneConfig(method="ttt-nn-dyneval", param="lr", grid=(1e-3,), docs=1, out=tmp_path,
                        model_args={"pretrained": str(tiny_lm), "index": str(small_index), "index_nprobe": 4,
                                    "max_length": 64, "device": "cpu", "batch_size": 1})
    result = run_tune(config, echo=lambda *a: None)
    assert result.value == 1e-3 and result.rows[0].steps > 0 and result.k is None and "index" not in result.args
    with pytest.raises(ValueError, match="unknown model argument 'k'"):  # other neighbour settings: still refused
        run_tune(replace(config, model_args={**config.model_args, "k": 3}, out=tmp_path / "b"), echo=lambda *a: None)


def test_the_grid_logic_runs_on_any_evaluator_in_milliseconds():
    """Evaluate in order, widen past the edge the choice lands on, refuse what the method
    cannot take, break ties by steps: no model, no index."""
    from lm_eval_ttt.tune import search_grid

    said = []
    figures = {1: 0.9, 2: 0.8, 4: 0.7, 8: 0.6, 16: 0.65}
    rows, best, reason, widened = search_grid((1, 2, 4), lambda v: GridRow(v, figures[v], v, 0.1), widen=5,
                                              echo=said.append, param="k")
    assert [r.value for r in rows] == [1, 2, 4, 8, 16] and widened == [8, 16]
    assert best.value == 8 and reason == "lowest validation bits per byte"
    rows, best, reason, widened = search_grid((1, 2, 4), lambda v: GridRow(v, figures[v], v, 0.1), widen=5,
                                              refuse=lambda v: "k: must be < 5" if v > 4 else None, echo=said.append)
    assert widened == [] and best.value == 4 and reason.endswith("(on the edge of the grid: widen it)")
    assert any("past it k: must be < 5: not widened" in line for line in said)
    rows, best, reason, _ = search_grid((1, 2), lambda v: GridRow(v, 0.5, 10 - v, 0.1), echo=said.append)
    assert best.value == 2 and "tie broken by fewer gradient steps" in reason


def test_tune_records_written_before_the_record_type_are_read(tmp_path):
    """docs/bench/tune-lora-lr.json was written by an earlier `ttt-nn tune`; a record read back
    equals the one written; a file that is no record is one error naming it."""
    from pathlib import Path

    from lm_eval_ttt.tunerecord import TuneRecordError

    old = TuneRecord.read(Path(__file__).parents[1] / "docs" / "bench" / "tune-lora-lr.json")
    assert (old.method, old.param, old.value, old.k, old.source) == ("ttt-nn", "lr", 1e-3, 20, "tuned")
    assert old.validation.count == 8 and [r.value for r in old.rows] == [1e-3, 3e-3, 1e-2, 3.33e-4]
    assert old.describe() == "lr=0.001 tuned on 8 validation docs"
    assert TuneRecord.read(old.write(tmp_path / "again.json")) == old
    (tmp_path / "bad.json").write_text('{"chosen": 1}')
    with pytest.raises(TuneRecordError, match=r"bad.json: not a tune record"):
        TuneRecord.read(tmp_path / "bad.json")


def test_a_method_without_neighbours_tuned_on_a_validation_file_opens_no_index(tiny_lm, default_corpus, tmp_path,
                                                                               monkeypatch):
    """It built the bundled index (minutes on a fresh machine) only to record its identity."""
    from lm_eval_ttt import assets

    monkeypatch.setattr(assets, "ensure_default_index", lambda: pytest.fail("the default index was opened"))
    split = tmp_path / "validation.jsonl"
    split.write_text((default_corpus / "python_docs.test.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    config = TuneConfig(method="ttt-nn-dyneval", param="lr", grid=(1e-3,), docs=1, out=tmp_path / "t",
                        validation_file=split, min_chars=300, max_chars=4000,
                        model_args={"pretrained": str(tiny_lm), "max_length": 64, "device": "cpu", "batch_size": 1})
    record = run_tune(config, echo=lambda *a: None)
    assert record.validation.index is None and record.validation.file == str(split) and record.rows[0].steps > 0
