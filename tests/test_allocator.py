"""Building a trainer on CPU makes malloc keep freed memory, so a training step does not fault in
again the pages the step before freed. Each case runs in its own interpreter: the setting is
process-wide, and another test may have built a trainer already."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# Faults taken by the last 10 of 40 cycles allocating, touching and freeing a 64 MB block,
# before and after a trainer is built for a small model on CPU (malloc's heap takes a few
# cycles to hold the block's aligned copies; then it serves each one from memory it kept).
PROBE = """
import json, resource, torch
from transformers import GPT2Config, GPT2LMHeadModel
from lm_eval_ttt.settings import TrainSettings
from lm_eval_ttt.trainers import build_trainer

def faults():
    counts = []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 2**20)  # 64 MB, every page written
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-10:])

first = faults()
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
build_trainer(model, TrainSettings(lr=1e-3), max_length=16, seed=0, pad_id=0, peft_loaded=False)
print(json.dumps({"before": first, "after": faults()}))
"""

PAGES_OF_A_BLOCK = 16 * 2**20 * 4 // 4096


def probe(**env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_cpu_trainer_makes_freed_memory_reused_without_page_faults():
    faults = probe()
    assert faults["before"] >= 10 * PAGES_OF_A_BLOCK  # each block mapped afresh and faulted in
    assert faults["after"] < PAGES_OF_A_BLOCK // 10  # served from memory an earlier block freed


def test_malloc_tuned_by_the_user_is_left_alone():
    faults = probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
    assert faults["after"] >= 10 * PAGES_OF_A_BLOCK
