"""Data parallel through the harness's own engine, on CPU: torchrun with 2 gloo processes and
HFLM's rank assignment (``helpers/dp_lm_eval.py``), against the harness run in this process.

With an odd document count the evaluator pads the shorter rank with a copy of its last
request; a rank that answered the copy from memory would make one ``all_gather`` fewer than
the other (HFLM's timeout is 52 weeks). Scoring is rank-local, so uneven shares, padding
copies and resumed documents cannot deadlock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, task_bits_per_byte

from lm_eval_ttt.runlog import rank_files, read_log

TASK = "ttt_stdlib_code"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_args(tiny_lm, small_index, out: Path, logs: Path) -> str:
    return (f"pretrained={tiny_lm},max_length=64,k=2,lr=1e-3,max_neighbor_tokens=64,index={small_index},seed=1,"
            f"log_dir={logs},neighbour_cache={out.parent / 'cache'}")


def lm_eval_args(tiny_lm, small_index, out: Path, logs: Path, limit: int) -> list[str]:
    from lm_eval_ttt.assets import task_configs_dir

    return ["--model", "ttt-nn", "--model_args", model_args(tiny_lm, small_index, out, logs),
            "--tasks", TASK, "--include_path", str(task_configs_dir() / "ttt"), "--limit", str(limit),
            "--device", "cpu",
            "--batch_size", "1", "--output_path", str(out)]


def in_process(tiny_lm, small_index, out: Path, logs: Path, limit: int) -> dict:
    """The same evaluation in one process (this one), through the harness's simple_evaluate."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.assets import task_configs_dir

    return simple_evaluate(model="ttt-nn", model_args=model_args(tiny_lm, small_index, out, logs), tasks=[TASK],
                           limit=limit, device="cpu", batch_size=1,
                           task_manager=TaskManager(include_path=str(task_configs_dir() / "ttt")))


def launch(args: list[str], processes: int) -> subprocess.Popen:
    if processes == 1:
        cmd = [str(BIN / "lm_eval"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port()),
               str(REPO / "tests" / "helpers" / "dp_lm_eval.py"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, timeout: int = 300) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]


def results(out: Path) -> dict:
    return json.loads(next(out.rglob("results_*.json")).read_text())


def stem_of(logs: Path) -> Path:
    return logs / next(logs.glob("*.settings.json")).name.removesuffix(".settings.json")


def lines(logs: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in logs.glob("*.rank*.jsonl"))


def test_two_processes_equal_one_and_a_changed_rank_count_resumes(tiny_lm, small_index, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(lm_eval_args(tiny_lm, small_index, two, two / "logs", 5), 2))  # 5 documents: 3 + 2 (+ a pad)
    reference = in_process(tiny_lm, small_index, one, one / "logs", 5)
    single, double = (read_log(stem_of(one / "logs")), read_log(stem_of(two / "logs")))
    assert len(rank_files(stem_of(two / "logs"))) == 2  # one file per rank, merged on read
    assert double.keys() == single.keys()
    for key, record in double.items():  # the same sums, to float rounding: each process runs its own thread count
        assert record["results"] == pytest.approx(single[key]["results"], rel=1e-7, abs=1e-6), key
    a, b = reference["results"][TASK]["bits_per_byte,none"], task_bits_per_byte(two, TASK)
    assert abs(a - b) <= 1e-6 * a, (a, b)
    assert results(two)["n-samples"][TASK]["effective"] == 5

    before = lines(two / "logs")  # one process on the two-process log: nothing is scored twice
    again = in_process(tiny_lm, small_index, tmp_path / "again", two / "logs", 5)
    assert lines(two / "logs") == before
    assert again["config"]["ttt_nn"]["this_process"]["scored"] == 0
    assert abs(again["results"][TASK]["bits_per_byte,none"] - a) <= 1e-6 * a


def test_a_killed_rank_resumes_without_rescoring_finished_documents(tiny_lm, small_index, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = launch(lm_eval_args(tiny_lm, small_index, out, logs, 9), 2)
    deadline = time.time() + 240
    while not (any(len(f.read_text().splitlines()) >= 2 for f in logs.glob("*.rank1.jsonl"))) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank dies mid-run, as on a preempted node
    proc.wait()
    stem = stem_of(logs)
    finished = set(read_log(stem))
    assert 0 < len(finished) < 8
    scored_before = lines(logs)
    resumed = in_process(tiny_lm, small_index, out, logs, 9)  # and resumes in one process
    after = read_log(stem)
    new_records = lines(logs) - scored_before
    assert new_records == len(set(after) - finished)  # only the unfinished documents were scored
    assert resumed["n-samples"][TASK]["effective"] == 9


def test_first_use_assets_are_built_once_by_concurrent_ranks(tmp_path):
    """Ranks started together on a fresh machine: one builds the default corpus (the model
    and the index take the same lock) while the others wait, then all use it."""
    script = """
import sys
from index_server import default_corpus
original = default_corpus.write_default_corpus
def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write("built\\n")
    return original(*args, **kwargs)
default_corpus.write_default_corpus = counted
from lm_eval_ttt import assets
print(assets.ensure_default_corpus())
"""
    env = {**os.environ, "TTT_NN_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([str(BIN / "python"), "-c", script, str(tmp_path / "builds")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-2000:]
    assert len({o.strip().splitlines()[-1] for o, _ in outputs}) == 1
    assert (tmp_path / "builds").read_text() == "built\n"
