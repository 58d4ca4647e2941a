"""`ttt-nn compare`: an experiment file, its checks, its plan, one real end-to-end comparison."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import run

from lm_eval_ttt.cli import build_parser, demo_runs, tune_config
from lm_eval_ttt.compare import Comparison, steps, tune_argv
from lm_eval_ttt.compare import run as compare
from lm_eval_ttt.experiment import ExperimentError, load
from lm_eval_ttt.tunerecord import GIVEN, TuneRecord


def experiment_text(tiny_lm, index, corpus_file, out, extra: str = "") -> str:
    return f"""
[experiment]
name = "tiny"
pretrained = "{tiny_lm}"
index = "{index}"
out = "{out}"
reference = "dyneval"

[args]
max_length = 64
max_neighbor_tokens = 64

[test]
task = "ttt_corpus"
metadata = {{ corpus_file = "{corpus_file}", sample = 2, seed = 0, min_chars = 300, max_chars = 3000 }}

[validation]
docs = 2
min_chars = 300
max_chars = 4000
widen = 0

[[method]]
label = "hf"
model = "hf"

[[method]]
label = "dyneval"
model = "ttt-nn-dyneval"
args = {{ iterations = 1 }}
tune = {{ param = "lr", grid = [1e-3, 1e-2] }}

[[method]]
label = "nearest"
model = "ttt-nn"
args = {{ k = 2 }}
tune = {{ param = "lr", grid = [1e-3, 1e-2] }}
note = "the k=2 nearest neighbours, nearest first"

[[method]]
label = "combined"
model = "ttt-nn"
args = {{ k = 2, lr = {{ chosen = "nearest" }}, dyneval_iterations = 1, dyneval_lr = 1e-3 }}
{extra}"""


@pytest.fixture
def write_experiment(tiny_lm, small_index, default_corpus, tmp_path):
    def write(extra: str = "", name: str = "exp.toml", out: Path | None = None, test_file: Path | None = None) -> Path:
        path = tmp_path / name
        path.write_text(experiment_text(tiny_lm, small_index, test_file or default_corpus / "stdlib_code.test.jsonl",
                                        out or tmp_path / "out", extra))
        return path

    return write


BAD = [
    ("replace", 'model = "ttt-nn-dyneval"', 'model = "ttt-nn-dynevl"',
     '"dyneval" model: unknown model \'ttt-nn-dynevl\' (did you mean \'ttt-nn-dyneval\'?)'),
    ("replace", "dyneval_lr = 1e-3", "dyneval_rate = 1e-3", "\"combined\" args: unknown model argument 'dyneval_rate' "
                                                             "(did you mean 'dyneval_lr'?)"),
    ("replace", "grid = [1e-3, 1e-2] }\nnote", 'grid = [1e-3, "fast"] }\nnote',
     "\"nearest\" tune.grid value 'fast': lr: expected a number, got 'fast'"),
    ("replace", 'label = "combined"', 'label = "nearest"', '"nearest" (entry 4): label used twice (also entry 3); '
                                                            "give each method its own label"),
    ("replace", "sample = 2", "sample = 2, corpus_file_x = 1", None),  # an unknown metadata key is the task's business
    ("replace", 'chosen = "nearest"', 'chosen = "neares"', "\"combined\" args.lr: no method is labelled 'neares' "
                                                           "(did you mean 'nearest'?)"),
    ("replace", 'chosen = "nearest"', 'chosen = "dyneval"', None),  # dyneval tunes lr too: allowed
    ("replace", "widen = 0", "widen = 0\ndocz = 3", "[validation]: unknown key 'docz' (did you mean 'docs'?)"),
    ("replace", "[args]\nmax_length = 64", "[args]\nmax_length = 64\nmax_neighbour_tokens = 5",
     "[args] max_neighbour_tokens: no method of this experiment takes it (did you mean 'max_neighbor_tokens'?)"),
    ("replace", "k = 2 }", "k = -1 }", '"nearest" args: k: must be >= 0, got -1'),
    ("replace", 'label = "combined"', 'label = "../combined"', "a label is letters, digits"),
    ("replace", "grid = [1e-3, 1e-2] }\nnote", "grid = [1e-3, 0.001] }\nnote", "a value appears twice"),
    ("replace", 'reference = "dyneval"', 'reference = "dynevl"', "[experiment] reference: no method is labelled"),
]


@pytest.mark.parametrize("kind, old, new, expected", BAD)
def test_a_mistake_in_the_file_is_one_line_naming_file_entry_and_fix(write_experiment, kind, old, new, expected):
    path = write_experiment()
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    if expected is None:
        load(path)
        return
    with pytest.raises(ExperimentError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


def test_missing_files_are_named_before_anything_runs(write_experiment, tmp_path):
    path = write_experiment()
    text = path.read_text()
    for old, new, expected in [
        ("stdlib_code.test.jsonl", "nope.test.jsonl", "[test] metadata.corpus_file: "),
        ('index = "', 'index = "/nonexistent', "[experiment] index: /nonexistent"),
    ]:
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ExperimentError) as error:
            load(path)
        assert expected in str(error.value) and re.search("does not exist|no such index directory", str(error.value))
        load(path, check_paths=False)  # the same file, checked on a machine without its data
    path.write_text(text.replace("[[method]]", "[[methods]]", 1))
    with pytest.raises(ExperimentError, match=r"top level: unknown key 'methods' \(did you mean 'method'\?\)"):
        load(path)
    path.write_text("[experiment\n")
    with pytest.raises(ExperimentError, match=r"not valid TOML: .*line 1"):
        load(path)


def test_the_cli_reports_a_bad_file_in_one_line_without_loading_a_model(write_experiment):
    path = write_experiment()
    path.write_text(path.read_text().replace('model = "ttt-nn-dyneval"', 'model = "ttt-nn-dynevl"'))
    proc = run("ttt-nn", "compare", str(path), check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ttt-nn: error: {path}: [[method]] \"dyneval\" model")


def test_tunes_come_before_the_runs_that_take_their_values(write_experiment):
    e = load(write_experiment())
    assert [(s.kind, s.label) for s in steps(e)] == [("tune", "dyneval"), ("tune", "nearest"), ("run", "hf"),
                                                      ("run", "dyneval"), ("run", "nearest"), ("run", "combined")]
    assert [(s.kind, s.label) for s in steps(e, ["combined"])] == [("tune", "nearest"), ("run", "combined")]


def test_a_printed_tune_command_is_the_same_tune(write_experiment):
    """A scheduler runs the printed `ttt-nn tune` line; its record must answer the declaration."""
    e = load(write_experiment())
    c = Comparison(e)
    config = c.tune_config(e.method("nearest"))
    argv = tune_argv(config)
    assert tune_config(build_parser().parse_args(argv[1:])) == config


def test_chosen_values_are_recorded_as_given_and_the_plan_waits_for_missing_tunes(write_experiment, tmp_path):
    e = load(write_experiment())
    lines = compare(e, print_plan=True, echo=lambda *a: None)
    assert lines[0].startswith("ttt-nn tune --method ttt-nn-dyneval --param lr --grid 0.001:0.01")
    assert "# run combined: waits for the tune of nearest" in lines
    hf = next(shlex.split(line) for line in lines if line.startswith("lm_eval --model hf"))
    assert "--log_samples" in hf and hf[hf.index("--output_path") + 1] == str(e.run_dir("hf"))
    lines = compare(e, only=["combined"], chosen={"nearest": "0.001"}, print_plan=True, echo=lambda *a: None)
    record = TuneRecord.read(e.tune_dir("nearest") / "tune.json")
    assert record.source == GIVEN and record.value == 0.001 and not record.tuned and record.rows == ()
    assert record.describe() == "lr=0.001 given, not tuned (given with --chosen)"
    (line,) = lines
    args = shlex.split(line)[shlex.split(line).index("--model_args") + 1]
    assert ",lr=0.001," in args and "tuned=" not in args  # combined fixes no tuned argument of its own
    with pytest.raises(ValueError, match="no method is labelled 'nope'"):
        compare(e, only=["nope"], print_plan=True, echo=lambda *a: None)


def test_compare_end_to_end_on_the_tiny_model(write_experiment, tmp_path, default_corpus):
    """The real command: tunes in process, every run through the stock lm_eval, the report with
    intervals; a rerun resumes everything and runs nothing; the report is rewritten from the logs
    and results alone, without the test documents (what a clone of the repository has)."""
    test_file = tmp_path / "test.jsonl"
    shutil.copy(default_corpus / "stdlib_code.test.jsonl", test_file)
    path = write_experiment(test_file=test_file)
    proc = run("ttt-nn", "compare", str(path), timeout=900)
    out = proc.stdout
    assert "[1/6] tune dyneval (ttt-nn-dyneval); time left: not measured yet for any of the 6 steps left" in out
    assert "[2/6] tune nearest (ttt-nn); about 0 min left for 1 of the 5 steps left (4 not measured yet)" in out
    e = load(path)
    report = (e.report_dir / "report.md").read_text()
    for label in ("hf", "dyneval", "nearest", "combined"):
        assert f"| ttt_corpus | {label} | 2 |" in report
    assert "bits/byte [95% CI]" in report and "bpb vs dyneval [95% CI]" in report
    assert "| nearest | lr |" in report and "tuned on 2 validation docs" in report
    assert "the k=2 nearest neighbours, nearest first" in report
    assert "| ttt_corpus: row / column | hf | dyneval | nearest | combined |" in report  # every pair
    nearest = TuneRecord.read(e.tune_dir("nearest") / "tune.json")
    assert nearest.tuned and nearest.validation.count == 2 and len(nearest.rows) == 2
    texts = [json.loads(line)["text"] for line in (default_corpus / "stdlib_code.test.jsonl").open()]
    for label in ("hf", "dyneval", "nearest", "combined"):
        (sidecar,) = e.run_dir(label).rglob("*.documents.jsonl")
        content = sidecar.read_text()
        records = [json.loads(line) for line in content.splitlines()]
        assert len(records) == 2 and all("results" in r and "bytes" in r for r in records)
        assert not any(t[:200] in content for t in texts)  # no corpus text in what is committed
    results = json.loads(next(e.run_dir("combined").rglob("results_*.json")).read_text())
    assert results["config"]["model_args"]["lr"] == nearest.value
    again = run("ttt-nn", "compare", str(path), timeout=600).stdout
    assert "6 of 6 steps already done" in again and "$ " not in again
    assert run("ttt-nn", "compare", str(path), "--plan").stdout.startswith("# nothing left to run")
    assert (e.report_dir / "report.md").read_text() == report
    test_file.unlink()
    (e.report_dir / "report.md").unlink()
    run("ttt-nn", "compare", str(path), "--report-only")
    assert (e.report_dir / "report.md").read_text() == report


def test_the_demo_shows_the_recommended_configuration_with_valid_arguments(tmp_path):
    """make demo's third row: the configuration the comparisons recommend, at rates chosen on
    validation documents (settings.RECOMMENDED), checked like any --model_args."""
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_ttt.model import TTTNNLM
    from lm_eval_ttt.settings import RECOMMENDED, parse_model_args

    args = build_parser().parse_args(["demo"])
    runs = demo_runs(args, tmp_path / "lm", tmp_path / "index")
    assert [(name, model) for name, _, model, _ in runs] == [("hf", "hf"), ("ttt-nn", "ttt-nn"),
                                                              ("recommended", "ttt-nn")]
    given = simple_parse_args_string(runs[2][3])
    assert {k: given[k] for k in RECOMMENDED} == RECOMMENDED and given["max_length"] == args.max_length
    parse_model_args(TTTNNLM.setting_groups, given)  # raises on an unknown or invalid argument


def test_a_given_value_is_checked_and_makes_the_tunes_that_take_it_stale(write_experiment):
    """--chosen nearest=X changes the arguments combined's tune ran with: its record no longer
    answers, in the same call; a value the argument refuses is an error."""
    from lm_eval_ttt.compare import CompareError
    from lm_eval_ttt.tune import budget, record_args
    from lm_eval_ttt.tunerecord import GridRow, Validation

    path = write_experiment()
    tune = 'tune = { param = "dyneval_lr", grid = [1e-3, 1e-2] }'
    text = path.read_text().replace(", dyneval_lr = 1e-3 }", " }\n" + tune)
    path.write_text(text)
    e = load(path)
    with pytest.raises(CompareError, match=r"--chosen nearest=-1: lr: must be > 0"):
        Comparison(e, {"nearest": "-1"}, write=False)
    config = Comparison(e, {"nearest": "0.01"}, write=False).tune_config(e.method("combined"))
    TuneRecord(method="ttt-nn", param="dyneval_lr", value=1e-3, args=record_args(config), grid=config.grid,
               rows=(GridRow(1e-3, 1.0, 1, 1.0),), validation=Validation(2, (1, 2)), budget=budget(config),
               ).write(e.tune_dir("combined") / "tune.json")
    assert "combined" in Comparison(e, {"nearest": "0.01"}, write=False).records
    assert "combined" not in Comparison(e, {"nearest": "0.001"}, write=False).records


def test_tune_only_runs_the_tunes_and_scores_no_test_document(write_experiment):
    """--tune-only: the tunes the selected methods need, their table, and no run."""
    e = load(write_experiment())
    printed = []
    table = compare(e, only=["combined"], tune_only=True, echo=printed.append)
    record = TuneRecord.read(e.tune_dir("nearest") / "tune.json")
    assert record.tuned and len(record.rows) == 2
    assert f"| nearest | lr | {record.value} | tuned on 2 validation docs" in table and table in printed
    assert not (e.tune_dir("dyneval") / "tune.json").exists()  # combined does not take dyneval's value
    assert not e.log_dir.exists() and not e.out.joinpath("runs").exists()
    assert build_parser().parse_args(["compare", "x.toml", "--tune-only"]).tune_only
