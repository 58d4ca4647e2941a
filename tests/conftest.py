"""Shared fixtures: a private ttt-nn home, the default corpus and index built once per run
with the README's own commands, and helpers to run the real CLIs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script of this venv; fail the test with its output if it fails."""
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def ttt_home(tmp_path_factory) -> Path:
    """A fresh TTT_NN_HOME so no cache from an earlier run can hide a missing step."""
    home = tmp_path_factory.mktemp("ttt_home")
    os.environ["TTT_NN_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # prove nothing is fetched from a hub
    return home


@pytest.fixture(scope="session")
def default_corpus(ttt_home) -> Path:
    from lm_eval_ttt.assets import default_corpus_dir

    out = default_corpus_dir()
    run("ttt-index", "default-corpus", "--out", str(out), "--quiet")
    return out


@pytest.fixture(scope="session")
def default_index(default_corpus) -> Path:
    """Built exactly as the README says (and where the model looks for it by default)."""
    from lm_eval_ttt.assets import default_index_dir

    out = default_index_dir()
    run("ttt-index", "build", *map(str, sorted(default_corpus.glob("*.index.jsonl"))), "--out", str(out), "--quiet")
    return out


@pytest.fixture(scope="session")
def small_corpus(default_corpus, tmp_path_factory) -> Path:
    """First 300 code documents plus the docs subset: quick to embed at 32 tokens."""
    out = tmp_path_factory.mktemp("small") / "small.jsonl"
    with open(default_corpus / "stdlib_code.index.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    lines += (default_corpus / "python_docs.index.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines), encoding="utf-8")
    return out


def requests(texts):
    """Harness rolling-likelihood requests for raw texts."""
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


def build_small(corpus: Path, out: Path, shards: int = 1, factory: str = "Flat", max_tokens: int = 32) -> Path:
    from index_server.build import BuildConfig, build_index
    from index_server.encoder import EncoderConfig

    build_index(BuildConfig(corpus=(corpus,), output=out, shards=shards, factory=factory,
                            encoder=EncoderConfig(max_tokens=max_tokens, batch_size=64), progress=False))
    return out
