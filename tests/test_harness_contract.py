"""The harness's contract: every request type, every flag, no stale or silent numbers.

Through the real ``lm_eval`` executable: k=0 answers every request type exactly as
``--model hf``, and a trained run over token- and TLS-protected gRPC shard servers trains,
logs and names its log files. In process: the settings hash covers every HFLM argument,
``--use_cache`` is refused, defaults follow hf, peft adapters train, batch-size detection
happens once, bad arguments fail before loading, and registration works without start-up files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from conftest import REPO, TEST_TASKS, fake_lm, make_cert, make_lm, requests, run

from lm_eval_ttt.documents import GENERATE, LOGLIKELIHOOD, ROLLING, group_documents
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import ModelArgumentError

TASKS = "ttt_test_mc,ttt_test_gen,ttt_stdlib_code"


def lm_eval(model: str, model_args: str, out, include, *extra: str, tasks: str = TASKS, check: bool = True):
    return run("lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks, "--include_path",
               str(include),
               "--limit", "2", "--device", "cpu", "--batch_size", "1", "--output_path", str(out), "--log_samples",
               *extra, check=check)


def samples(out) -> dict[str, list]:
    """Per task, the model's answers to each request, in document order."""
    answers = {}
    for path in sorted(out.rglob("samples_*.jsonl")):
        task = path.name.split("_", 1)[1].rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        answers[task] = [row["resps"] for row in sorted(rows, key=lambda r: r["doc_id"])]
    return answers


@pytest.fixture(scope="module")
def runs(tiny_lm, small_index, task_dir, tmp_path_factory):
    """hf, ttt-nn k=0 and ttt-nn k=2 on a multiple-choice, a generation and a rolling task;
    k=2 retrieves from a gRPC shard server that wants a bearer token over TLS."""
    from index_server.server import ServerConfig, start_server

    out = tmp_path_factory.mktemp("contract")
    cert, key = make_cert(out)
    (out / "token").write_text("right-token\n")
    server, port, _ = start_server(ServerConfig(index=small_index, token="right-token", tls_cert=cert, tls_key=key))
    common = f"pretrained={tiny_lm},max_length=64"
    remote = (f"index=grpc://127.0.0.1:{port},index_token_file={out / 'token'},index_tls_ca={cert},"
              f"retrieval_timeout=10,max_neighbor_tokens=128")
    try:
        procs = {
            "hf": lm_eval("hf", common, out / "hf", task_dir),
            "k0": lm_eval("ttt-nn", f"{common},k=0", out / "k0", task_dir),
            "k2": lm_eval("ttt-nn", f"{common},k=2,{remote},lr=1e-3,neighbour_cache={out / 'cache'}", out / "k2",
                          task_dir),
        }
    finally:
        server.stop(0)
    return out, procs


def test_k0_equals_hf_on_every_request_type(runs):
    out, _ = runs
    hf, k0 = samples(out / "hf"), samples(out / "k0")
    assert set(hf) == {"ttt_test_mc", "ttt_test_gen", "ttt_stdlib_code"}
    assert k0 == hf


def test_non_rolling_tasks_are_trained_and_logged(runs):
    out, _ = runs
    hf, k2 = samples(out / "hf"), samples(out / "k2")
    assert k2["ttt_test_mc"] != hf["ttt_test_mc"]  # trained before scoring the choices
    results_file = next((out / "k2").rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    info = results["config"]["ttt_nn"]
    files = sorted(out.glob("k2/ttt-nn-logs/*.rank*.jsonl"))
    assert info["log_files"] == [str(f.resolve()) for f in files]  # the files themselves, under --output_path
    assert json.loads(open(info["settings_file"]).read()) == info["settings"]
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert "right-token" not in results_file.read_text()  # the secret is never written
    by_type = {}
    for r in records:
        by_type.setdefault(r["request_type"], []).append(r)
    assert sorted(by_type) == sorted([GENERATE, LOGLIKELIHOOD, ROLLING])
    mc = by_type[LOGLIKELIHOOD]
    assert len(mc) == 2 and all(len(r["results"]) == 4 and len(r["neighbour_ids"]) == 2 for r in mc)  # 4 choices
    assert all(r["train_steps"] > 0 for r in records)
    assert [r["results"][0] for r in by_type[GENERATE]] == [s[0][0] for s in k2["ttt_test_gen"]]
    assert all(r["train_tokens"] > 0 and r["train_s"] > 0 and r["score_s"] > 0 for r in records)  # what each cost


def test_report_reads_real_results(runs, tmp_path):
    """`ttt-nn report` on what lm_eval wrote: the hf base and the trained run, its log read."""
    from lm_eval_ttt.report import load_runs, markdown_table

    out, _ = runs
    loaded = {r.method: r for r in load_runs([out / "hf", out / "k2"]) if r.task == "ttt_stdlib_code"}
    assert set(loaded) == {"hf", "ttt-nn"} and loaded["ttt-nn"].steps_per_document > 0
    kept = loaded["ttt-nn"].metrics["bits_per_byte"] / loaded["hf"].metrics["bits_per_byte"]
    assert f"| {kept:.3f} [" in markdown_table(list(loaded.values()))  # the ratio to hf, then its interval


def test_runs_are_quiet(runs):
    _, procs = runs
    for proc in procs.values():
        assert "overrides existing task" not in proc.stderr
    assert "Running loglikelihood requests:" not in procs["k2"].stderr + procs["k2"].stdout  # HFLM's inner bar


def test_settings_identity_covers_every_hflm_argument(tiny_lm, tmp_path):
    base = make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0)
    same = make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0, batch_size=2)  # cannot change a score
    assert same.log_stem == base.log_stem
    for change in ({"prefix_token_id": 0}, {"add_bos_token": True}, {"softmax_dtype": "float64"},
                   {"revision": "other"}, {"seed": 2}):
        other = make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0, **change)
        assert other.log_stem != base.log_stem, change
    stems, before = [], torch.initial_seed()
    try:
        for harness_seed in (1234, 1235):  # --seed sets torch's seed before the model is built
            torch.manual_seed(harness_seed)
            stems.append(make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0, seed=None).log_stem)
    finally:
        torch.manual_seed(before)
    assert stems[0] != stems[1]


def test_use_cache_is_refused(tiny_lm, tmp_path):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.raises(ValueError, match="--use_cache is refused for --model ttt-nn"):
        simple_evaluate(model="ttt-nn", model_args=f"pretrained={tiny_lm},k=0,max_length=64,log_dir={tmp_path}",
                        tasks=["ttt_test_mc"], limit=1, device="cpu", use_cache=str(tmp_path / "cache"),
                        task_manager=TaskManager(include_path=str(TEST_TASKS)))


def test_defaults_follow_hf_dtype_auto_and_the_harness_seed(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(bf16)
    lm = TTTNNLM(pretrained=str(bf16), k=0, device="cpu", log_dir=str(tmp_path))
    assert lm.model.dtype == torch.bfloat16  # hf's dtype=auto, not float32
    torch.manual_seed(77)  # what --seed does before the model is built
    assert TTTNNLM(pretrained=str(tiny_lm), k=0, device="cpu", log_dir=str(tmp_path)).seed == 77


@pytest.mark.parametrize("args, message", [
    ({"k": -3}, r"k: must be >= 0, got -3"),
    ({"max_neighbour_tokens": 5},
     r"unknown model argument 'max_neighbour_tokens' \(did you mean 'max_neighbor_tokens'\?\)"),
    ({"lr": 0}, r"lr: must be > 0"),
    ({"order": "random"}, r"order: must be one of nearest, farthest"),
    ({"eval_at_k": "0:9", "k": 2}, r"eval_at_k values must lie in \[0, k=2\]"),
    ({"dtype": "float33"}, r"dtype: expected auto or a torch dtype name"),
    ({"alpha": 0.5}, r"alpha \(adaptive compute\) needs select=sift"),
])
def test_bad_arguments_fail_before_the_model_loads(args, message, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelArgumentError, match=message):
        TTTNNLM(pretrained=str(tmp_path / "no-such-model"), device="cpu", **args)  # loading would raise OSError
    assert time.perf_counter() - start < 2


def test_bad_argument_on_the_command_line_is_one_clear_error(tiny_lm, task_dir, tmp_path):
    proc = lm_eval("ttt-nn", f"pretrained={tiny_lm},max_neighbour_tokens=5", tmp_path, task_dir, check=False,
                   tasks="ttt_test_mc")
    assert proc.returncode != 0
    assert "did you mean 'max_neighbor_tokens'" in proc.stderr


def test_json_model_args_with_lists(tiny_lm, tmp_path):
    from conftest import fake_retriever

    lm = TTTNNLM.create_from_arg_obj({"pretrained": str(tiny_lm), "k": 2, "eval_at_k": [0, 1], "log_dir": str(tmp_path),
                                      "retriever": fake_retriever(tmp_path, ["a document", "another one"])},
                                     {"device": "cpu", "batch_size": 1})
    assert lm.eval_at_k == [0, 1, 2]


def test_peft_adapter_is_trained_and_reset_and_the_base_stays_frozen(tiny_lm, corpus_texts, test_docs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), LoraConfig(r=4, init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, peft=str(adapter), lr=1e-3, max_neighbor_tokens=128)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    trained = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    lm.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    (record,) = read_log(lm.log_stem).values()
    assert record["train_steps"] > 0
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # reset, base untouched


def test_batch_size_auto_is_detected_once(tiny_lm, test_docs, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    calls = []
    original = HFLM._detect_batch_size
    monkeypatch.setattr(HFLM, "_detect_batch_size", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    lm = make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0, batch_size="auto", max_batch_size=4)
    lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    lm.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    assert len(calls) == 1


@pytest.mark.parametrize("method, request_type", [("ttt-nn-interp", GENERATE), ("ttt-nn-dyneval", LOGLIKELIHOOD)])
def test_unsupported_request_type_is_a_clear_error_before_any_work(tiny_lm, tmp_path, method, request_type):
    from lm_eval.api.instance import Instance

    from lm_eval_ttt.tune import model_class

    lm = make_lm(model_class(method), tmp_path, tiny_lm, None, **({"k": 0} if method == "ttt-nn-interp" else {}))
    args = ("ctx", {"until": ["\n"]}) if request_type == GENERATE else ("ctx", " x")
    with pytest.raises(NotImplementedError, match=f"--model {method} cannot answer {request_type} requests"):
        getattr(lm, request_type)([Instance(request_type, {}, args, 0)])
    assert not list(tmp_path.glob("logs/*.jsonl"))


def _python_without_startup_files(*args: str, cwd) -> subprocess.CompletedProcess:
    """The venv's interpreter as a PYTHONPATH / `python -S` install sees it: site-packages on
    the path, but no .pth (or .start) file processed."""
    import site

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *site.getsitepackages()])}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_registration_without_startup_files_uses_the_fallback(tiny_lm, tmp_path):
    common = ["--model", "ttt-nn", "--model_args", f"pretrained={tiny_lm},k=0,max_length=64", "--tasks",
              "ttt_test_mc", "--include_path", str(TEST_TASKS), "--limit", "1", "--device", "cpu"]
    stock = _python_without_startup_files("-m", "lm_eval", *common, cwd=tmp_path)
    assert stock.returncode != 0  # no start-up hook ran: the stock CLI cannot know ttt-nn ...
    fallback = _python_without_startup_files("-m", "lm_eval_ttt", *common, cwd=tmp_path)
    assert fallback.returncode == 0, fallback.stderr[-3000:]  # ... the fallback registers it
    assert "ttt_test_mc" in fallback.stdout


def test_wheel_ships_both_startup_files_and_the_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = zipfile.ZipFile(next(tmp_path.glob("ttt_nn-*.whl")))
    names = wheel.namelist()
    assert wheel.read("lm_eval_ttt.pth").decode().strip() == "import lm_eval_ttt._registration"
    assert wheel.read("lm_eval_ttt.start").decode().strip() == "lm_eval_ttt._registration:install"  # PEP 829
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[lm_eval.models]" in entry_points and "ttt-nn = lm_eval_ttt.model:TTTNNLM" in entry_points
    assert any(n.startswith("lm_eval_ttt/task_configs/ttt/") for n in names)
    assert any(n.startswith("lm_eval_ttt/task_configs/pile/") for n in names)


def test_the_hook_reads_the_entry_points():
    from lm_eval_ttt import _registration

    assert set(_registration.models()) == {"ttt-nn", "ttt-nn-context", "ttt-nn-interp", "ttt-nn-dyneval"}


def test_readme_documents_every_model_argument():
    from lm_eval_ttt import settings

    readme = (REPO / "README.md").read_text()
    groups = (settings.NeighbourSettings, settings.TrainSettings, settings.TTTSettings, settings.ContextSettings,
              settings.InterpolationSettings, settings.DynamicEvalSettings)
    for name, default, _ in settings.help_rows(groups):
        name = {v: k for k, v in settings.ALIASES.items()}.get(name, name)
        shown = "-" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        assert f"| `{name}` | {shown} |" in readme, name


def test_a_built_model_and_retriever_can_be_injected(tiny_lm, corpus_texts, test_docs, tmp_path):
    """Unit tests (and notebooks) pass objects instead of paths: a model with its tokenizer
    and a retriever over an index that is already open (the caller's: the model leaves it open)."""
    from conftest import fake_retriever
    from transformers import AutoModelForCausalLM, AutoTokenizer

    retriever = fake_retriever(tmp_path, corpus_texts)
    lm = TTTNNLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_lm),
                 tokenizer=AutoTokenizer.from_pretrained(tiny_lm),
                 retriever=retriever, k=2, max_length=64, log_dir=str(tmp_path), device="cpu", seed=1)
    assert lm.retriever is retriever
    lm.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    (record,) = read_log(lm.log_stem).values()
    assert record["neighbour_ids"] == retriever.neighbours(test_docs[0], 2).ids
    lm.close()
    assert not retriever.index.closed
    with pytest.raises(ModelArgumentError, match="a model object needs its tokenizer object"):
        TTTNNLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_lm), k=0)


def test_every_request_type_resumes_from_the_log(tiny_lm, corpus_texts, tmp_path):
    from lm_eval.api.instance import Instance

    mc = [Instance(LOGLIKELIHOOD, {}, ("Question: which module parses JSON?\nAnswer:", c), 0, metadata=("mc", 0, 1))
          for c in (" json", " os")]
    gen = [Instance(GENERATE, {}, ("def add(a, b):\n    return", {"until": ["\n"], "max_gen_toks": 4}), 0,
                    metadata=("gen", 0, 1))]
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, lr=1e-3, max_neighbor_tokens=128)
    first = lm.loglikelihood(mc), lm.generate_until(gen)
    lm.score_documents = lambda *a: pytest.fail("a logged document was scored again")
    assert (lm.loglikelihood(mc), lm.generate_until(gen)) == first
    records = list(read_log(lm.log_stem).values())
    assert all(r["retrieve_s"] < 0.05 for r in records)  # neighbours came from the up-front retrieval


def test_sampled_repeats_differ_and_greedy_ones_are_generated_once(tiny_lm, tmp_path):
    from lm_eval.api.instance import Instance

    lm = make_lm(TTTNNLM, tmp_path, tiny_lm, None, k=0)
    sampled = Instance(GENERATE, {}, ("def f(", {"until": ["\n"], "max_gen_toks": 8, "temperature": 1.0}), 0,
                       metadata=("gen", 0, 3))
    out = lm.generate_until([sampled] * 3)  # repeats=3: the evaluator passes the instance 3 times
    assert len(set(out)) > 1
    greedy = Instance(GENERATE, {}, ("def g(", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
                      0, metadata=("gen", 1, 2))
    calls = []
    original = lm.score_documents
    lm.score_documents = lambda docs, n: calls.append(docs) or original(docs, n)
    assert len(set(lm.generate_until([greedy] * 2))) == 1 and len(calls) == 1


def test_choices_with_their_own_contexts_retrieve_on_the_shared_question():
    from lm_eval.api.instance import Instance

    question = "The trophy does not fit in the suitcase because the "
    choices = [Instance(LOGLIKELIHOOD, {}, (question + option, " is too big."), 0, metadata=("wino", 7, 1))
               for option in ("trophy", "suitcase")]
    (document,) = group_documents(LOGLIKELIHOOD, choices)
    assert document.query("full") == question


def test_interpolation_without_neighbours_is_the_base_model(tiny_lm, test_docs, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_ttt.baselines import InterpolationLM

    lm = make_lm(InterpolationLM, tmp_path, tiny_lm, None, k=0, **{"lambda": 0.1})
    ours = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    assert ours == pytest.approx(HFLM.loglikelihood_rolling(lm, requests(test_docs), disable_tqdm=True), rel=1e-6)


def test_full_training_of_low_precision_weights_is_refused(tiny_lm, corpus_texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_ttt.ttt import LowPrecisionWeightsError

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(bf16)
    with pytest.raises(LowPrecisionWeightsError, match="bfloat16: updated in place, most test-time training steps"):
        fake_lm(TTTNNLM, tmp_path, bf16, corpus_texts, k=2, dtype="auto")
    lora = fake_lm(TTTNNLM, tmp_path, bf16, corpus_texts, k=2, dtype="auto", adapter="lora")
    assert all(p.dtype == torch.float32 for p in lora.model.parameters() if p.requires_grad)


def test_dyneval_takes_no_retrieval_arguments(tiny_lm, tmp_path):
    from lm_eval_ttt.baselines import DynamicEvalLM

    with pytest.raises(ModelArgumentError, match="unknown model argument 'k'"):
        DynamicEvalLM(pretrained=str(tiny_lm), k=5, device="cpu")
