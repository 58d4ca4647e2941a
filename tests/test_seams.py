"""The declared seams: the index a retriever queries and the trainer a method drives are
Protocols every implementation satisfies, the package has no import circle, request types
are dispatched in one place, and the helpers that do one job (atomic writes, closing the
retriever, the harness's output path) do it."""

from __future__ import annotations

import ast
import gc
import inspect
from pathlib import Path

import pytest
from conftest import REPO, fake_lm, fake_retriever, make_lm, requests
from fakes import FakeIndex

from index_server.atomic import atomic_write, remove_stale_temporaries
from index_server.client import GrpcIndex
from index_server.index import KnnIndex
from index_server.search import LocalIndex
from lm_eval_ttt.lora import BatchedLoRATrainer
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.trainer import Trainer
from lm_eval_ttt.ttt import TestTimeTrainer

PACKAGES = ("index_server", "lm_eval_ttt")


def protocol_members(protocol) -> dict[str, inspect.Signature | None]:
    hints = getattr(protocol, "__annotations__", {})
    members = {name: None for name in hints}
    for name, value in vars(protocol).items():
        if isinstance(value, property):
            members[name] = None  # an attribute, as the protocol reads it
        elif callable(value) and not name.startswith("_"):
            members[name] = inspect.signature(value)
    return members


def assert_implements(cls, protocol, instance=None) -> None:
    """Every member of the protocol, methods with the protocol's parameter names."""
    for name, signature in protocol_members(protocol).items():
        if signature is None:  # an attribute: set in __init__ or declared on the class
            assert instance is None or hasattr(instance, name), (cls.__name__, name)
            continue
        ours = inspect.signature(getattr(cls, name))
        assert list(ours.parameters) == list(signature.parameters), (cls.__name__, name, ours, signature)


@pytest.mark.parametrize("cls", [LocalIndex, GrpcIndex, FakeIndex])
def test_every_index_backend_implements_knn_index(cls):
    assert_implements(cls, KnnIndex)


def test_open_indexes_are_knn_indexes(small_index, corpus_texts):
    from index_server.index import open_index
    from index_server.server import ServerConfig, start_server

    local = open_index(small_index)
    server, port, _ = start_server(ServerConfig(index=small_index))
    try:
        remote = open_index(f"grpc://127.0.0.1:{port}")
        for index in (local, remote, FakeIndex(corpus_texts)):
            assert isinstance(index, KnnIndex)
            assert_implements(type(index), KnnIndex, index)
        assert remote.knobs == local.knobs
        remote.close()
    finally:
        server.stop(0)


@pytest.mark.parametrize("cls", [TestTimeTrainer, BatchedLoRATrainer])
def test_every_trainer_implements_the_trainer_protocol(cls):
    assert_implements(cls, Trainer)


@pytest.mark.parametrize("args", [{}, {"adapter": "lora"}, {"adapter": "lora", "doc_batch": 2}, {"train_layers": 1}])
def test_built_trainers_are_trainers(tiny_lm, corpus_texts, tmp_path, args):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, **args)
    assert isinstance(lm.trainer, Trainer)
    assert_implements(type(lm.trainer), Trainer, lm.trainer)
    assert lm.trainer.slots == args.get("doc_batch", 1)


def _imports(path: Path, package: str) -> set[str]:
    """Modules of our packages that ``path`` imports, at any depth (function-level too)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0] if not path.name == "__init__.py" else module
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for pkg in PACKAGES
               for p in (REPO / pkg).rglob("*.py") if "_proto" not in p.parts}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name.split(".")[0]) if m in modules and m != name}
    return graph


def test_no_import_circle_anywhere_in_the_package():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not any(m.startswith("lm_eval_ttt") for name, deps in graph.items() if name.startswith("index_server")
                   for m in deps)  # the index side knows no model code
    assert all(deps <= {"index_server.digest", "index_server.options"} for name, deps in graph.items()
               if name in ("index_server.options", "index_server.wire"))  # leaves of data


def test_request_types_are_spelled_in_one_module():
    """One dispatch: the request-type names appear as strings only where KINDS defines them."""
    names = {"loglikelihood_rolling", "loglikelihood", "generate_until"}
    spelled = {}
    for path in sorted((REPO / "lm_eval_ttt").rglob("*.py")):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        if strings & names:
            spelled[path.name] = sorted(strings & names)
    assert spelled == {"documents.py": sorted(names)}


def test_atomic_write_is_whole_or_nothing(tmp_path):
    target = tmp_path / "out.json"
    assert atomic_write(target, "first\n") == __import__("hashlib").sha256(b"first\n").hexdigest()

    def broken(f):
        f.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)  # the first writer wins
    assert target.read_text() == "first\n"
    stale = tmp_path / ".out.json.tmp-" f"{__import__('socket').gethostname()}-999999999"
    stale.write_text("left by a killed writer")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists()


def test_the_model_closes_the_retriever_it_opened(tiny_lm, small_index, tmp_path):
    """Channels and corpus files are closed by close(), and at the latest when the model is
    collected; a retriever handed in stays its owner's."""
    from index_server.server import ServerConfig, start_server

    server, port, _ = start_server(ServerConfig(index=small_index))
    try:
        lm = make_lm(TTTNNLM, tmp_path, tiny_lm, f"grpc://127.0.0.1:{port}", k=1)
        channel = lm.retriever.index.servers[0].channel
        lm.close()
        with pytest.raises(ValueError, match="closed channel"):
            channel.unary_unary("/tttnn.knn.v1.KnnShard/Info")(b"")
        lm.close()  # idempotent
        lm = make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, k=1)
        store = lm.retriever.index.corpus
        del lm
        gc.collect()
        assert store._open == []  # the corpus files were closed
    finally:
        server.stop(0)
    injected = fake_retriever(tmp_path, ["one text", "another text"])
    lm = make_lm(TTTNNLM, tmp_path, tiny_lm, None, retriever=injected, k=1)
    lm.close()
    assert not injected.index.closed


def test_the_log_lands_under_the_harness_output_path(tiny_lm, tmp_path):
    from conftest import TEST_TASKS
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.harness import harness_output_path

    results = simple_evaluate(model="ttt-nn", model_args=f"pretrained={tiny_lm},k=0,max_length=64",
                              tasks=["ttt_test_mc"],
                              limit=1, device="cpu", task_manager=TaskManager(include_path=str(TEST_TASKS)),
                              evaluation_tracker=EvaluationTracker(output_path=str(tmp_path / "out")))
    (log_file,) = results["config"]["ttt_nn"]["log_files"]
    assert Path(log_file).parent == (tmp_path / "out" / "ttt-nn-logs").resolve()

    def not_the_harness(evaluation_tracker):  # a local of that name elsewhere on the stack is not the harness's
        return harness_output_path()

    assert not_the_harness(EvaluationTracker(output_path=str(tmp_path / "elsewhere"))) is None


def test_checking_the_settings_leaves_the_hflm_arguments_alone(tiny_lm, corpus_texts, tmp_path):
    from lm_eval_ttt.settings import TrainSettings
    from lm_eval_ttt.trainers import check_train_settings, implied_hf_kwargs

    given = {"max_length": 64}
    check_train_settings(TrainSettings(precision="bf16"), given)
    assert given == {"max_length": 64}
    assert implied_hf_kwargs(TrainSettings(precision="bf16")) == {"mixed_precision_dtype": "bfloat16"}
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, precision="bf16")
    assert str(lm.mixed_precision_dtype) == "torch.bfloat16"  # scoring autocasts as training does


def test_help_texts_derive_from_their_constants():
    from index_server.options import NLIST_PER_NPROBE, REFINE_FACTOR
    from lm_eval_ttt import settings

    rows = {name: help for name, _, help in settings.help_rows([settings.NeighbourSettings, settings.TrainSettings])}
    lora = f"adapter=lora: {settings.DEFAULT_LORA_LR:g}, chosen on validation documents at " \
           f"k={settings.DEFAULT_LORA_LR_K}"
    assert lora in rows["lr"]
    assert f"{settings.PAPER_LR_SMALL:g} below" in rows["lr"]
    assert f"else {REFINE_FACTOR})" in rows["index_refine_factor"]
    assert f"nlist/{NLIST_PER_NPROBE})" in rows["index_nprobe"]
    assert set(settings.PRECISIONS) == set(settings.TrainSettings.__dataclass_fields__["precision"].metadata["choices"])


def test_every_record_has_the_same_cost_fields_for_every_method(tiny_lm, corpus_texts, test_docs, tmp_path):
    from lm_eval_ttt.baselines import DynamicEvalLM, InContextLM, InterpolationLM
    from lm_eval_ttt.runlog import read_log

    fields = {"train_steps", "train_tokens", "train_s", "score_s", "reset_s", "retrieve_s"}
    for cls, args in ((TTTNNLM, {"max_neighbor_tokens": 64}), (InContextLM, {}), (InterpolationLM, {}),
                      (DynamicEvalLM, {"lr": 1e-3})):
        lm = fake_lm(cls, tmp_path / cls.method, tiny_lm, corpus_texts, **args)
        lm.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
        (record,) = read_log(lm.log_stem).values()
        assert fields <= set(record), (cls.method, fields - set(record))
        assert record["score_s"] > 0
        trains = cls in (TTTNNLM, DynamicEvalLM)
        assert (record["train_tokens"] > 0 and record["train_s"] > 0) == trains, cls.method
