"""Hyperparameters chosen on validation documents, never on test ones (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TEST_TASKS, run
from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.tune import TuneConfig, model_class, requests_for, run_tune, validation_documents


@pytest.fixture(scope="module")
def tuned(tiny_lm, small_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    config = TuneConfig(method="ttt-nn", param="lr", grid=(1e-4, 3e-3, 3e-2), docs=3, out=out,
                        model_args={"pretrained": str(tiny_lm), "index": str(small_index), "k": 2, "max_length": 64,
                                    "max_neighbor_tokens": 64, "device": "cpu", "batch_size": 1, "seed": 1,
                                    "neighbour_cache": str(out / "cache")})
    return config, run_tune(config, echo=lambda *a: None)


def test_tune_picks_the_lowest_validation_bits_per_byte_of_its_own_table(tuned, small_index):
    config, result = tuned
    rows = result["rows"]
    assert [r["value"] for r in rows] == [1e-4, 3e-3, 3e-2]
    assert result["chosen"] == min(rows, key=lambda r: r["bits_per_byte"])["value"]
    assert len({round(r["bits_per_byte"], 6) for r in rows}) == 3  # the grid makes a difference
    assert all(r["steps"] > 0 and r["seconds"] > 0 for r in rows)
    assert json.loads((config.out / "tune.json").read_text())["chosen"] == result["chosen"]
    from index_server.options import open_index

    documents = validation_documents(open_index(str(small_index)), 3, 0, 300, 4000)
    assert [d for d, _ in documents] == result["validation"]["ids"]
    for row in rows:  # every number equals a separate evaluation of that value
        lm = model_class("ttt-nn")(**{**config.model_args, "lr": row["value"], "log_dir": str(config.out / "again")})
        lls = lm.loglikelihood_rolling(requests_for(documents), disable_tqdm=True)
        assert bits_per_byte(lls, utf8_bytes([t for _, t in documents])) == pytest.approx(row["bits_per_byte"],
                                                                                         rel=1e-12)


def test_a_widened_grid_resumes_old_values_with_their_own_costs(tuned, tmp_path):
    """Re-running a tune with more values reuses the logged ones; their seconds were the wall
    time of the resume (~0 s), which also broke ties in favour of resumed values."""
    import shutil
    from dataclasses import replace

    config, result = tuned
    shutil.copytree(config.out / "logs", tmp_path / "logs")  # the earlier tune's logs, another tune.json
    again = run_tune(replace(config, grid=(1e-4, 3e-3), out=tmp_path), echo=lambda *a: None)
    assert all(r["seconds"] > 0 for r in result["rows"])
    for old, new in zip(result["rows"], again["rows"]):
        assert new["bits_per_byte"] == old["bits_per_byte"] and new["steps"] == old["steps"]
        assert new["seconds"] == old["seconds"] > 0


def test_validation_documents_never_retrieve_themselves(tuned):
    config, result = tuned
    logs = config.out / "logs"
    stems = {p.name.split(".rank")[0] for p in logs.glob("*.rank*.jsonl")}
    assert len(stems) == 3  # one log per grid value
    own = dict(zip(range(len(result["validation"]["ids"])), result["validation"]["ids"]))
    for stem in stems:
        for record in read_log(logs / stem).values():
            corpus_id = own[record["doc_id"]]
            assert corpus_id not in record["neighbour_ids"]
            assert corpus_id in record["excluded"]  # it was the nearest: excluded by id


def test_tune_never_opens_a_test_split_file(tiny_lm, default_index, default_corpus, tmp_path):
    """An audit hook sees every file the tune process opens: the test splits are not among them."""
    script = f"""
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
from lm_eval_ttt.cli import main
code = main(["tune", "--method", "ttt-nn-interp", "--param", "lambda", "--grid", "0.1:0.3", "--docs", "2",
             "--pretrained", {str(tiny_lm)!r}, "--k", "2", "--max-length", "64", "--out", {str(tmp_path / 'tune')!r}])
test_files = sorted({{p for p in opened if p.endswith(".test.jsonl")}})
print("TEST FILES OPENED:", test_files)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TEST FILES OPENED: []" in proc.stdout
    assert "chosen lambda=" in proc.stdout


def test_a_run_records_the_tuned_value_and_refuses_a_mismatch(tuned, tiny_lm, small_index, tmp_path):
    config, result = tuned
    path = config.out / "tune.json"
    args = (f"pretrained={tiny_lm},index={small_index},k=2,max_length=64,max_neighbor_tokens=64,"
            f"neighbour_cache={tmp_path / 'cache'},tuned={path}")
    common = ["--tasks", "ttt_test_mc", "--include_path", str(TEST_TASKS), "--limit", "1", "--device", "cpu"]
    run("lm_eval", "--model", "ttt-nn", "--model_args", f"{args},lr={result['chosen']}", *common, "--output_path",
        str(tmp_path / "ok"))
    info = json.loads(next((tmp_path / "ok").rglob("results_*.json")).read_text())["config"]["ttt_nn"]["tuned"]
    assert (info["param"], info["value"]) == ("lr", result["chosen"])
    assert info["validation"]["ids"] == result["validation"]["ids"] and info["validation"]["count"] == 3
    other = next(v for v in config.grid if v != result["chosen"])
    proc = run("lm_eval", "--model", "ttt-nn", "--model_args", f"{args},lr={other}", *common, "--output_path",
               str(tmp_path / "bad"), check=False)
    assert proc.returncode != 0 and f"chose lr={result['chosen']} for ttt-nn, but this run is ttt-nn" in proc.stderr


def test_report_labels_tuned_rows():
    from lm_eval_ttt.report import _label

    settings = {"method": "ttt-nn", "k": 10, "order": "nearest", "select": "nearest", "adapter": "none"}
    tuned = {"param": "lr", "value": 1e-4, "validation": {"count": 16, "ids": list(range(16))}}
    method, label = _label({"ttt_nn": {"settings": settings, "tuned": tuned}})
    assert label == "ttt-nn k=10 (lr=0.0001 tuned on 16 validation docs)"
    assert _label({"ttt_nn": {"settings": settings}})[1] == "ttt-nn k=10"
