"""Shared fixtures: a private ttt-nn home, the default corpus and index built once per run
with the commands docs/indexes.md gives, a small index and a tiny random model (a saved small config
with the bundled tokenizer) for fast unit tests, and helpers to run the real CLIs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TEST_TASKS = REPO / "tests" / "task_configs"
TINY_CONFIG = REPO / "tests" / "assets" / "tiny-llama"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script of this venv; fail the test with its output if it fails."""
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
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
    """Built exactly as docs/indexes.md says (and where the model looks for it by default)."""
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


@pytest.fixture(scope="session")
def small_index(small_corpus, tmp_path_factory) -> Path:
    return build_small(small_corpus, tmp_path_factory.mktemp("small_index") / "index")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 1.6M-parameter random Llama with the bundled SmolLM2 tokenizer, saved like any HF
    model: unit tests exercise the real transformers/lm-eval code paths in milliseconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lm_eval_ttt.assets import BUNDLED_LM_GGUF, BUNDLED_LM_PACKAGE

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CONFIG)).save_pretrained(out)
    gguf_dir = importlib.util.find_spec(BUNDLED_LM_PACKAGE).submodule_search_locations[0]
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_LM_GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def test_docs(default_corpus) -> list[str]:
    """Three short held-out code documents."""
    with open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return [d for d in docs if 300 < len(d) < 3000][:3]


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """One --include_path (the CLI takes one) with copies of the bundled and the test-only
    tasks (lm-eval does not follow symlinked folders)."""
    import shutil

    from lm_eval_ttt.assets import task_configs_dir

    out = tmp_path_factory.mktemp("tasks")
    shutil.copytree(task_configs_dir() / "ttt", out / "ttt")
    shutil.copy(task_configs_dir() / "_rolling_template.yaml", out)
    shutil.copytree(TEST_TASKS, out / "test")
    return out


def requests(texts):
    """Harness rolling-likelihood requests for raw texts."""
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


_EMBEDDED: dict[tuple, Path] = {}


def build_small(corpus: Path, out: Path, shards: int = 1, factory: str = "Flat", max_tokens: int = 32,
                num_parts: int | None = None, **kw) -> Path:
    """An index over ``corpus`` with the real encoder, embedded once per corpus file (as it is
    on disk) and encoder setting, then built from those embeddings with the given layout (a
    build from embeddings equals the build from the corpus: test_scale checks it)."""
    from index_server.build import BuildConfig, build_index
    from index_server.embed import EmbedConfig, run_embed
    from index_server.encoder import EncoderConfig

    stat = Path(corpus).stat()
    key = (str(Path(corpus).resolve()), stat.st_size, stat.st_mtime_ns, max_tokens, num_parts)
    if key not in _EMBEDDED:
        embeddings = Path(os.environ["TTT_NN_HOME"]) / "test-embeddings" / str(len(_EMBEDDED))
        run_embed(EmbedConfig(corpus=(Path(corpus),), output=embeddings, num_parts=num_parts, progress=False,
                              encoder=EncoderConfig(max_tokens=max_tokens, batch_size=64)))
        _EMBEDDED[key] = embeddings
    build_index(BuildConfig(output=out, embeddings=_EMBEDDED[key], shards=shards, factory=factory, progress=False,
                            **kw))
    return out


def cli(capsys, command: str, *args: str, check: bool = True) -> SimpleNamespace:
    """A console script's ``main`` run in this process (no interpreter start-up): its exit
    code and what it printed, like ``run``'s result."""
    from index_server.cli import main as ttt_index
    from lm_eval_ttt.cli import main as ttt_nn

    capsys.readouterr()
    code = {"ttt-index": ttt_index, "ttt-nn": ttt_nn}[command](list(args))
    out, err = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"{command} {' '.join(args)} exited {code}\n{out[-3000:]}\n{err[-5000:]}")
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def make_lm(cls, tmp_path: Path, tiny_lm: Path, index: Path | str | None, **kw):
    """A harness model on the tiny LM and a small index, logging under tmp_path."""
    from lm_eval_ttt.settings import NeighbourSettings

    args = dict(pretrained=str(tiny_lm), max_length=64, log_dir=str(tmp_path / "logs"), device="cpu", batch_size=1,
                seed=1)
    if NeighbourSettings in cls.setting_groups:  # methods that retrieve
        args.update(k=3, neighbour_cache=str(tmp_path / "cache"))
        if index is not None:
            args["index"] = str(index)
    args.update(kw)
    return cls(**args)


@pytest.fixture(scope="session")
def corpus_texts(small_corpus) -> list[str]:
    """The small corpus's texts, for a ``FakeIndex``."""
    return [json.loads(line)["text"] for line in small_corpus.read_text(encoding="utf-8").splitlines()]


def fake_retriever(tmp_path: Path, texts, index=None, **settings):
    """A real ``Retriever`` over a ``FakeIndex`` (or the given index) and its ``FakeEncoder``."""
    from fakes import FakeIndex

    from lm_eval_ttt.retriever import Retriever
    from lm_eval_ttt.settings import NeighbourSettings, build

    index = index or FakeIndex(texts)
    return Retriever(index, build(NeighbourSettings, settings), tmp_path / "cache", encoder=index.encoder)


def fake_lm(cls, tmp_path: Path, tiny_lm: Path, texts, index=None, **kw):
    """A harness model on the tiny LM whose neighbours come from a ``FakeIndex`` over ``texts``
    (a method without neighbours gets the plain ``make_lm``)."""
    from lm_eval_ttt.settings import NeighbourSettings, known_names

    if NeighbourSettings not in cls.setting_groups:
        return make_lm(cls, tmp_path, tiny_lm, None, **kw)
    args = {"k": 3, **kw}
    names = known_names([NeighbourSettings])
    retriever = fake_retriever(tmp_path, texts, index, **{k: v for k, v in args.items() if k in names})
    return make_lm(cls, tmp_path, tiny_lm, None, retriever=retriever, **args)


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate for localhost / 127.0.0.1, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def task_bits_per_byte(output_dir: Path, task: str) -> float:
    results = sorted(output_dir.rglob("results_*.json"))[-1]
    return json.loads(results.read_text())["results"][task]["bits_per_byte,none"]
