import json
import math
import re
import struct
from pathlib import Path

import numpy as np
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
        if data["config"]["model"] == "hf":  # no per-document scores of its own (no --log_samples here)
            assert f"| 2 | {bpb:.4f} | {row['byte_perplexity,none']:.4f} |" in table
            continue
        cells = f"| {row['byte_perplexity,none']:.4f} | {row['word_perplexity,none']:.2f} | {bpb / base:.3f} ["
        assert re.search(rf"\| 2 \| {bpb:.4f} \[[0-9.]+, [0-9.]+\] {re.escape(cells)}", table), table
    ttt = next(r for r in runs if r.method == "ttt-nn")
    points = curve_points(ttt)
    assert [k for k, _, _ in points] == [0, 1, 2]
    assert points[0][1] == 0 < points[1][1] < points[2][1]  # gradient steps grow with k
    assert points[-1][2] == pytest.approx(ttt.metrics["bits_per_byte"], rel=1e-9)  # final point = harness metric
    label = "ttt-nn k=2 eval_at_k=0:1:2 max_neighbor_tokens=64 lr=0.001"  # the arguments as given, no paths
    assert ttt.label == label and f"| ttt_stdlib_code | {label} | 2 |" in table  # bits per byte against steps
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
    row = table.split(f"| {ttt.label} |")[1].splitlines()[0]
    assert row.startswith(f" 2 | {ttt.metrics['bits_per_byte']:.4f} [")
    assert f"| {kept:.3f} [" in row  # against its own model's base, not the other model's 9.0
    assert ttt.label.endswith(f"[{Path(ttt.model).name}]")
    assert any(r.label == "hf max_length=64 [other-model]" for r in hf_runs)


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


def test_the_steps_at_a_point_count_dynamic_evaluation_on_the_document(tmp_path):
    """Neighbours, then dynamic evaluation: the steps at its (only) scoring point are the
    neighbour steps plus those on the document's own windows, as steps/doc counts them."""
    from lm_eval_ttt.report import Run

    record = {"request_type": ROLLING, "bytes": 100, "results": [-50.0], "results_at_k": {"2": [-50.0]},
              "chunk_losses": [[1.0], [1.0, 1.0]], "neighbour_steps": 3, "document_steps": 4, "train_steps": 7}
    (point,) = curve_points(Run(tmp_path, "t", "ttt-nn", "ttt-nn", {}, 1, 0.0, records=[record]))
    assert point[:2] == (2, 7)


def test_labels_are_the_arguments_as_given_without_paths():
    """No guessing back from settings: the model and what it was given, paths and devices left out."""
    from lm_eval_ttt.report import label_from_args

    assert label_from_args("ttt-nn-dyneval", {"iterations": 1, "log_dir": "/x", "device": "cpu"}) == \
        "ttt-nn-dyneval iterations=1"
    given = "pretrained=/m,index=/i,k=10,lr=0.0001,tuned=/t/tune.json,neighbour_cache=/c"
    assert label_from_args("ttt-nn", given, {"describe": "lr=0.0001 tuned on 8 validation docs"}) == \
        "ttt-nn k=10 lr=0.0001 (lr=0.0001 tuned on 8 validation docs)"
    assert label_from_args("hf", {}) == "hf"


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
    assert {r.cpu for r in runs} == {None} and "| ? |" in table  # these results files record no environment
    here = "This CPU"
    for run in runs:
        run.cpu = here
    cheap = Run(tmp_path, "ttt_stdlib_code", "x", "cheap and good", {"bits_per_byte": 0.1}, 1, 1.0,
                records=[{"score_s": 0.001}], cpu=here)
    rows = [line for line in cost_table(runs + [cheap]).splitlines() if line.startswith("| ttt_stdlib_code")]
    assert [line.endswith("| yes |") for line in rows] == [True] + [False] * len(runs)  # it dominates every other
    elsewhere = Run(tmp_path, "ttt_stdlib_code", "x", "timed elsewhere", {"bits_per_byte": 0.1}, 1, 1.0,
                    records=[{"score_s": 0.001}], cpu="Other CPU")
    table = cost_table(runs + [elsewhere])
    assert "| This CPU |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ttt_stdlib_code")]
    assert rows[0].endswith("| Other CPU | yes |")  # its own CPU's front, which takes nothing off this one's
    assert sum(line.endswith("| yes |") for line in rows) == 1 + len(pareto_front(
        [(r.seconds_per_document[0], r.metrics["bits_per_byte"]) for r in runs]))
    assert "timed on 2 CPUs" in table and "compare seconds only between runs on the same CPU" in table
    from lm_eval_ttt.report import plot_seconds

    found = {id(r): type("NoInterval", (), {"bits_per_byte": None})() for r in runs + [elsewhere]}
    width, height, _ = png_size(plot_seconds(runs + [elsewhere], tmp_path / "two-cpus.png", found))
    assert width >= 400 and height >= 300
    width, height, _ = png_size(_report(results, tmp_path) / "bpb_vs_seconds.png")
    assert width >= 400 and height >= 300


def test_experts_offline_cost_is_spread_over_the_documents_and_its_payoff_stated(results, tmp_path):
    from lm_eval_ttt.report import Run, cost_table, plot_seconds

    def run(label, seconds, offline=None):
        return Run(tmp_path, "t", "ttt-nn", label, {"bits_per_byte": 1.0}, 48, 1.0, records=[{"score_s": seconds}],
                   cpu="C", offline_s=offline)

    runs = [run("experts", 2.0, offline=960.0), run("ttt-nn", 22.0), run("fast", 1.0),
            run("experts-slow", 30.0, offline=960.0)]
    table = cost_table(runs)
    (row,) = [line for line in table.splitlines() if line.startswith("| t | experts |")]
    assert "| 20.0 |" in row  # 960 s over 48 documents
    assert "experts (t): 960 s offline; fewer seconds in all after 48 documents than ttt-nn" in table  # 960/(22-2)
    assert "than fast" not in table and "than experts-slow" not in table  # faster, or built alike
    assert "| t | ttt-nn | 22.0 | - | 22.0 | - | - |" in table
    assert "two CPUs" not in table
    runs[0].offline_cpu = "B"
    assert "960 s offline (built on B, run on C: seconds of two CPUs)" in cost_table(runs)
    found = {id(r): type("NoInterval", (), {"bits_per_byte": None})() for r in runs}
    width, height, _ = png_size(plot_seconds(runs, tmp_path / "offline.png", found))
    assert width >= 400 and height >= 300
    (results_file,) = sorted(results.rglob("results_*.json"))[-1:]
    data = json.loads(results_file.read_text())
    data["config"].setdefault("ttt_nn", {})["experts"] = {"offline_s": 100.0}
    (tmp_path / "results_x.json").write_text(json.dumps(data))
    assert {r.offline_s for r in load_runs([tmp_path / "results_x.json"])} == {100.0}  # read from the results


def test_the_cpu_is_read_from_the_environment_lm_eval_records():
    from lm_eval_ttt.report import cpu_of

    # results files lm_eval wrote for the committed scale comparison, on two machines
    runs = Path(__file__).resolve().parents[1] / "docs" / "scale" / "compare" / "runs"
    for label, cpu in (("top", "Intel(R) Xeon(R) Processor"), ("nearest", "AMD EPYC")):
        (results,) = (runs / label).rglob("results_*.json")
        assert cpu_of(json.loads(results.read_text())) == cpu
    assert cpu_of({"pretty_env_info": "CPU:\nArchitecture: x86_64\nModel name:\nThread(s) per core: 1"}) is None
    assert cpu_of({}) is None and cpu_of({"pretty_env_info": "no CPU section"}) is None


def _report(results, tmp_path) -> Path:
    assert ttt_nn(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    return tmp_path / "report"


def test_the_interval_of_two_documents_is_computed_by_hand():
    """Two documents: a resample holds both of one, or one of each (in either order). Their
    bits per byte are those of document a alone, of b alone, and of both; at 10,000 resamples
    the 2.5% and 97.5% quantiles are the two single-document figures."""
    from lm_eval_ttt.intervals import bits_per_byte_interval, ratio_interval

    a, b = (-100.0, 100), (-300.0, 200)  # 1.443 and 2.164 bits per byte
    interval = bits_per_byte_interval({"a": a, "b": b})
    assert interval.value == pytest.approx(400 / (300 * math.log(2)))
    assert interval.low == pytest.approx(100 / (100 * math.log(2)))
    assert interval.high == pytest.approx(300 / (200 * math.log(2)))
    base = {"a": (-200.0, 100), "b": (-300.0, 200)}  # ratios per document: 0.5 and 1.0
    ratio = ratio_interval({"a": a, "b": b}, base)
    assert ratio.value == pytest.approx((400 / 300) / (500 / 300))
    assert (ratio.low, ratio.high) == (pytest.approx(0.5), pytest.approx(1.0)) and ratio.documents == 2


def test_identical_runs_have_a_ratio_of_exactly_one_with_no_width():
    from lm_eval_ttt.intervals import ratio_interval

    rng = np.random.default_rng(1)
    docs = {i: (float(-rng.uniform(50, 5000)), int(rng.integers(100, 9000))) for i in range(48)}
    same = ratio_interval(docs, dict(docs))
    assert (same.value, same.low, same.high, same.documents) == (1.0, 1.0, 1.0, 48)
    better = ratio_interval({i: (ll * 0.9, n) for i, (ll, n) in docs.items()}, docs)
    assert better.high < 1 and better.excludes(1.0)  # every document better: separated
    mixed = {i: (ll * (0.9 if i % 2 else 1.1), n) for i, (ll, n) in docs.items()}
    assert not ratio_interval(mixed, docs).excludes(1.0)  # half better, half worse: not separated


def test_the_base_comes_from_samples_or_a_k0_point(results, tmp_path):
    """hf's per-document scores come from its --log_samples file; without one, from a ttt-nn
    run's k=0 point; each run's ratio to it has an interval."""
    from lm_eval_ttt.report import base_scores, intervals

    runs = load_runs([results])
    ttt = next(r for r in runs if r.method == "ttt-nn")
    hf = next(r for r in runs if r.method == "hf")
    assert hf.scores() == {}  # the fixture's hf results have no samples
    k0 = base_scores(runs, ttt)
    assert k0 == ttt.scores(at_k=0) and len(k0) == 2
    found = intervals(runs, reference=ttt.label)[id(ttt)]
    assert found.vs_reference.value == found.vs_reference.low == found.vs_reference.high == 1.0
    hf_file = next((results / "hf").rglob("results_*.json"))
    stamp = hf_file.stem.removeprefix("results_")
    samples = hf_file.with_name(f"samples_ttt_stdlib_code_{stamp}.jsonl")
    samples.write_text("".join(json.dumps({"doc_id": i, "bits_per_byte": [ll * 2, n]}) + "\n"
                               for i, (ll, n) in enumerate(k0.values())))
    try:
        runs = load_runs([results])
        hf = next(r for r in runs if r.method == "hf")
        assert base_scores(runs, ttt) == hf.scores()
        assert sorted(hf.scores().values()) == sorted((ll * 2, n) for ll, n in k0.values())
    finally:
        samples.unlink()


def test_a_k0_point_with_experts_is_not_the_base_model(results):
    """Experts change a document's scores at k=0: such a run's k=0 point is no stand-in for hf."""
    import dataclasses

    from lm_eval_ttt.report import base_scores

    runs = load_runs([results])
    ttt = next(r for r in runs if r.method == "ttt-nn")
    with_experts = dataclasses.replace(ttt, label="experts", offline_s=10.0)
    assert base_scores([with_experts], with_experts) == {}
    assert base_scores([with_experts, ttt], with_experts) == ttt.scores(at_k=0)


def test_a_runs_documents_are_those_its_samples_name(tmp_path):
    """A log keyed by settings holds every run of those settings (another sample of the same
    test split too): the run's records are the ones its --log_samples file names, one per
    doc_id, so a text given twice is two documents, as the harness counts it."""
    from lm_eval_ttt.documents import args_key
    from lm_eval_ttt.report import run_records

    texts = ["first text", "second text", "a text of another sample"]
    log = tmp_path / "ttt-nn-abc.rank0.jsonl"
    log.write_text("".join(json.dumps({"doc_key": args_key(ROLLING, [[t], 0]), "task": "t", "doc_id": i,
                                       "request_type": ROLLING, "bytes": len(t), "results": [-float(i + 1)],
                                       **({"copies": 2} if i == 0 else {})}) + "\n"
                           for i, t in enumerate(texts)))
    results = tmp_path / "results_2026-01-01T00-00-00.json"
    data = {"config": {"ttt_nn": {"log_files": [str(log)]}}, "n-samples": {"t": {"effective": 3}}}
    (tmp_path / "samples_t_2026-01-01T00-00-00.jsonl").write_text("".join(
        json.dumps({"doc_id": d, "arguments": {"gen_args_0": {"arg_0": texts[i]}}, "bits_per_byte": [0.0, 1]}) + "\n"
        for d, i in ((0, 0), (1, 1), (2, 0))))
    records = run_records(results, data, "t")
    assert [(r["doc_id"], r["results"], r["bytes"], "copies" in r) for r in records] == [
        (0, [-1.0], len(texts[0]), False), (1, [-2.0], len(texts[1]), False), (2, [-1.0], len(texts[0]), False)]
