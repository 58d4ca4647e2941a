import json
import math
import re
import struct
from pathlib import Path

import pytest
from conftest import fake_lm, requests

from lm_eval_ttt.cli import main as ttt_nn
from lm_eval_ttt.documents import ROLLING
from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes
from lm_eval_ttt.report import curve_points, load_runs, markdown_table


def write_results(out: Path, model: str, model_args: dict, texts: list[str], lls: list[float], info: dict | None,
                  task: str = "ttt_stdlib_code", seconds: float = 10.0) -> Path:
    """A results file as `lm_eval --output_path` writes it: the harness's metrics of the given
    log-likelihoods, the model's arguments and, for our models, their ``get_model_info``."""
    total, n_bytes = sum(lls), utf8_bytes(texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    config = {"model": model, "model_args": model_args, **({"ttt_nn": info} if info else {})}
    data = {"results": {task: {"alias": task, "bits_per_byte,none": bits_per_byte(lls, n_bytes),
                               "byte_perplexity,none": math.exp(-total / n_bytes),
                               "word_perplexity,none": math.exp(-total / words)}},
            "config": config, "n-samples": {task: {"original": len(texts), "effective": len(texts)}},
            "total_evaluation_time_seconds": str(seconds)}
    path = out / model / f"results_{len(list(out.rglob('results_*.json'))):04d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def results(tiny_lm, corpus_texts, test_docs, tmp_path_factory):
    """Runs of three of our methods (the real models, on the fake index) plus the hf base on
    two documents, written as results files with their logs."""
    from lm_eval.models.huggingface import HFLM

    from lm_eval_ttt.baselines import InContextLM, InterpolationLM
    from lm_eval_ttt.model import TTTNNLM

    out = tmp_path_factory.mktemp("runs")
    docs = test_docs[:2]
    for name, cls, args in [
        ("ttt", TTTNNLM, dict(k=2, eval_at_k="0:1:2", max_neighbor_tokens=64, lr=1e-3)),
        ("ctx", InContextLM, dict(k=2)),
        ("interp", InterpolationLM, {"k": 2, "lambda": 0.1}),
    ]:
        lm = fake_lm(cls, out / name, tiny_lm, corpus_texts, **args)
        lls = lm.loglikelihood_rolling(requests(docs), disable_tqdm=True)
        write_results(out / name, cls.method, {"pretrained": str(tiny_lm), **args}, docs, lls,
                      lm.get_model_info()["ttt_nn"])
    hf_lls = HFLM.loglikelihood_rolling(lm, requests(docs), disable_tqdm=True)  # the base weights: interp trains none
    write_results(out / "hf", "hf", {"pretrained": str(tiny_lm), "max_length": 64}, docs, hf_lls, None)
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data


def test_report_table_equals_inputs_and_plots_are_real_images(results, tmp_path):
    assert ttt_nn(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    runs = load_runs([results])
    assert {r.method for r in runs} == {"hf", "ttt-nn", "ttt-nn-context", "ttt-nn-interp"}
    table = (tmp_path / "report" / "report.md").read_text()
    base = next(r for r in runs if r.method == "hf").metrics["bits_per_byte"]
    for file in results.rglob("results_*.json"):
        data = json.loads(file.read_text())
        row = data["results"]["ttt_stdlib_code"]
        bpb = row["bits_per_byte,none"]
        cells = f"| {row['byte_perplexity,none']:.4f} | {row['word_perplexity,none']:.2f} | {bpb / base:.1%} | 2 |"
        assert f"| {bpb:.4f} {cells}" in table
    ttt = next(r for r in runs if r.method == "ttt-nn")
    points = curve_points(ttt)
    assert [k for k, _, _ in points] == [0, 1, 2]
    assert points[0][1] == 0 < points[1][1] < points[2][1]  # gradient steps grow with k
    assert points[-1][2] == pytest.approx(ttt.metrics["bits_per_byte"], rel=1e-9)  # final point = harness metric
    assert "| ttt_stdlib_code | ttt-nn k=2 lr=0.001 | 2 |" in table  # bits per byte against steps
    for name in ("bpb_vs_k.png", "bpb_vs_steps.png", "bpb_by_method.png", "train_cost.png", "bpb_vs_seconds.png"):
        width, height, data = png_size(tmp_path / "report" / name)
        assert width >= 400 and height >= 300
        assert len(data) > 10_000  # axes, bars, lines and labels: not a blank canvas
    assert markdown_table(runs) in table


def test_each_run_is_compared_with_the_hf_run_of_its_own_model(results, tmp_path):
    """With hf runs of two models in one report, a method's "kept" share must use the base of
    the model it ran, not whichever hf run came first, and labels must say which model."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(results, mixed)
    hf_file = next((mixed / "hf").rglob("results_*.json"))
    other = json.loads(hf_file.read_text())
    other["config"]["model_args"] = "pretrained=SomeOrg/other-model,max_length=64"  # as the CLI records a string
    other["results"]["ttt_stdlib_code"]["bits_per_byte,none"] = 9.0
    (hf_file.parent / "results_0000-other.json").write_text(json.dumps(other))  # sorts before the real base
    runs = load_runs([mixed])
    hf_runs = [r for r in runs if r.method == "hf"]
    assert len(hf_runs) == 2 and len({r.model for r in hf_runs}) == 2
    ttt = next(r for r in runs if r.method == "ttt-nn")
    own = next(r for r in hf_runs if r.model == ttt.model)
    assert own.metrics["bits_per_byte"] != 9.0
    kept = ttt.metrics["bits_per_byte"] / own.metrics["bits_per_byte"]
    table = markdown_table(runs)
    assert f"| {ttt.label} | {ttt.metrics['bits_per_byte']:.4f} |" in table
    assert f"{kept:.1%} |" in table.split(ttt.label)[1].splitlines()[0]
    assert ttt.label.endswith(f"[{Path(ttt.model).name}]")
    assert any(r.label == "hf [other-model]" for r in hf_runs)


def test_a_resumed_run_says_its_wall_time_leaves_out_the_resumed_documents(results, tmp_path):
    """A rerun that took its documents from the log reports seconds, not the run's cost."""
    import shutil

    shutil.copytree(results / "ttt", tmp_path / "ttt")
    file = next((tmp_path / "ttt").rglob("results_*.json"))
    data = json.loads(file.read_text())
    data["config"]["ttt_nn"]["this_process"] = {"scored": 0, "resumed": 2, "degraded": 0}
    file.write_text(json.dumps(data))
    (run_,) = load_runs([tmp_path / "ttt"])
    assert run_.resumed == 2
    assert markdown_table([run_]).rstrip().endswith(f"| {run_.wall_s:.0f} (2 documents resumed from the log) |")
    (fresh,) = load_runs([results / "ttt"])
    assert fresh.resumed == 0 and markdown_table([fresh]).rstrip().endswith(f"| {fresh.wall_s:.0f} |")


def test_a_document_that_stopped_early_adds_no_point_of_its_own(tmp_path):
    """Keys of results_at_k are the neighbours a document reached: one that stopped at 3 must
    count its k=3 score at k=5 and 10, and not create a point k=3 where the others count their
    final scores."""
    from lm_eval_ttt.report import Run

    def doc(scores, n):
        return {"request_type": ROLLING, "bytes": 100, "results": [scores[-1][1]],
                "results_at_k": {str(k): [ll] for k, ll in scores}, "chunk_losses": [[1.0]] * n}

    full = doc([(0, -80.0), (5, -60.0), (10, -50.0)], 10)
    stopped = doc([(0, -80.0), (3, -70.0)], 3)
    run_ = Run(tmp_path, "t", "ttt-nn", "ttt-nn", {}, 2, 0.0, records=[full, stopped])
    points = curve_points(run_)
    assert [k for k, _, _ in points] == [0, 5, 10]

    assert points[1][2] == pytest.approx(bits_per_byte([-60.0, -70.0], 200))
    assert points[1][1] == (5 + 3) / 2  # steps: each document's own
    stopped["copies"] = 2  # the harness had the same text twice and counts it twice
    assert curve_points(run_)[1][2] == pytest.approx(bits_per_byte([-60.0, -70.0, -70.0], 300))


def test_labels_of_every_method(tmp_path):
    """dyneval's settings have no k (it retrieves nothing): its label must not need one."""
    from lm_eval_ttt.report import _label

    def config(**settings):
        return {"ttt_nn": {"settings": settings}}

    assert _label(config(method="ttt-nn-dyneval", iterations=1)) == ("ttt-nn-dyneval", "ttt-nn-dyneval iterations=1")
    assert _label(config(method="ttt-nn", k=10, order="farthest"))[1] == "ttt-nn k=10 farthest-first"
    assert _label(config(method="ttt-nn-interp", k=10, lam=0.01))[1] == "ttt-nn-interp k=10 lambda=0.01"
    assert _label(config(method="ttt-nn-context", k=10))[1] == "ttt-nn-context k=10"
    assert _label({"model": "hf"}) == ("hf", "hf")
    # the cheaper and combined configurations are told apart from full ttt-nn at the same k
    cheap = config(method="ttt-nn", k=5, train_layers=6, neighbour_batch=4, dyneval_iterations=1, dyneval_lr=2e-4)
    assert _label(cheap)[1] == "ttt-nn k=5 top-6-blocks batch=4 +dyneval x1 dyneval_lr=0.0002"
    plain = config(method="ttt-nn", k=5, train_layers=None, neighbour_batch=1, dyneval_iterations=0, dyneval_lr=2e-4)
    assert _label(plain)[1] == "ttt-nn k=5"
    assert _label(config(method="ttt-nn", k=10, exclude_duplicates=True))[1] == "ttt-nn k=10 no-near-duplicates"


def test_a_repeated_document_counts_as_often_as_the_harness_counts_it(tiny_lm, corpus_texts, test_docs, tmp_path):
    """The harness scores a text given twice twice; we train and log it once, with its copies,
    and the report's last curve point equals the harness's own bits per byte."""
    from lm_eval_ttt.model import TTTNNLM
    from lm_eval_ttt.report import Run
    from lm_eval_ttt.runlog import read_log

    model = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=1, eval_at_k="0:1", max_neighbor_tokens=32, lr=1e-3)
    texts = [test_docs[0], test_docs[1], test_docs[0]]
    lls = model.loglikelihood_rolling(requests(texts), disable_tqdm=True)
    records = list(read_log(model.log_stem).values())
    assert sorted(r.get("copies", 1) for r in records) == [1, 2]
    points = curve_points(Run(tmp_path, "t", "ttt-nn", "ttt-nn", {}, 3, 0.0, records=records))
    assert points[-1][2] == pytest.approx(bits_per_byte(lls, utf8_bytes(texts)), rel=1e-9)


def test_bits_per_byte_against_seconds_marks_the_pareto_front(results, tmp_path):
    from lm_eval_ttt.report import Run, cost_table, pareto_front

    assert pareto_front([(1.0, 0.9), (2.0, 0.8), (3.0, 0.85), (0.5, 1.0), (2.0, 0.95)]) == [3, 0, 1]
    runs = load_runs([results])
    table = cost_table(runs)
    for run in runs:
        seconds, logged = run.seconds_per_document
        assert logged == (run.method != "hf")  # hf has no per-document log: its wall time
        assert f"| {run.label} | {seconds:.1f}{'' if logged else ' (wall)'} |" in table
    ttt = next(r for r in runs if r.method == "ttt-nn")
    assert ttt.per_document("train_tokens") > 0 and f"{ttt.per_document('train_tokens'):.0f}" in table
    cheap = Run(tmp_path, "ttt_stdlib_code", "x", "cheap and good", {"bits_per_byte": 0.1}, 1, 1.0,
                records=[{"score_s": 0.001}])
    rows = [line for line in cost_table(runs + [cheap]).splitlines() if line.startswith("| ttt_stdlib_code")]
    assert [line.endswith("| yes |") for line in rows] == [True] + [False] * len(runs)  # it dominates every other
    width, height, _ = png_size(_report(results, tmp_path) / "bpb_vs_seconds.png")
    assert width >= 400 and height >= 300


def _report(results, tmp_path) -> Path:
    assert ttt_nn(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    return tmp_path / "report"
