"""Where the time of a TTT-NN document goes, and ttt-nn vs a reference-style loop.

Usage: python benchmarks/bench_ttt.py [--docs 4] [--k 10] [--max-length 256] [--cap 128]

Three measurements on the same held-out documents of the bundled code task, in one run:
1. ttt-nn as the harness runs it: wall time per document split into retrieve / train /
   score / reset (from its own per-document log).
2. The bare compute inside it: the same forward+backward+step calls on the same chunks and
   forward passes over the same scoring windows, nothing else. Overhead = (1) / (2).
3. A reference-style loop (socialfoundations/tttlm): weights restored with
   load_state_dict from a deep copy, the document re-scored after every neighbour with the
   full log-softmax copied to the CPU, optimizer reset per document (so the final numbers
   can match ours). Speed-up = (3) / (1), and the final bits per byte are compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bundled_corpus, print_table  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402

from lm_eval_ttt.model import TTTNNLM  # noqa: E402
from lm_eval_ttt.ttt import chunk_tokens  # noqa: E402


def bare_compute(lm: TTTNNLM, text: str, neighbour_texts: list[str]) -> float:
    """Seconds of model calls alone: training steps on the chunks, forwards on the windows."""
    model, params = lm.model, [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lm.ttt_config.lr, eps=1e-8, weight_decay=0.01)
    chunks = [c for t in neighbour_texts for c in chunk_tokens(
        lm.tokenizer(t, add_special_tokens=False).input_ids, lm.max_length, lm.ttt_config.max_neighbor_tokens)]
    inputs = [torch.tensor([ctx + cont]) for ctx, cont in lm.windows(text)]
    start = time.perf_counter()
    model.train()
    for chunk in chunks:
        ids = torch.tensor([chunk])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for ids in inputs:
            model(ids)
    seconds = time.perf_counter() - start
    lm.trainer.reset()
    return seconds


def reference_loop(lm: TTTNNLM, text: str, neighbour_texts: list[str], saved_state: dict) -> float:
    """Returns the final log-likelihood; scores after every neighbour as the reference did."""
    model, params = lm.model, [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lm.ttt_config.lr, eps=1e-8, weight_decay=0.01)

    def score() -> float:
        total = 0.0
        with torch.no_grad():
            for ctx, cont in lm.windows(text):
                ids = torch.tensor([(ctx + cont)[:-1]])
                logprobs = torch.log_softmax(model(ids).logits, dim=-1).cpu()  # whole vocabulary to the CPU
                targets = torch.tensor(cont)
                total += logprobs[0, -len(cont):].gather(1, targets[:, None]).sum().item()
        return total

    ll = score()
    torch.manual_seed(lm.ttt_config.seed)
    for neighbour in neighbour_texts:
        model.train()
        for chunk in chunk_tokens(lm.tokenizer(neighbour, add_special_tokens=False).input_ids,
                                  lm.max_length, lm.ttt_config.max_neighbor_tokens):
            ids = torch.tensor([chunk])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        ll = score()
    model.load_state_dict(saved_state)
    return ll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--cap", type=int, default=128, help="max_neighbor_tokens")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    texts = [json.loads(l)["text"] for l in open(bundled_corpus() / "stdlib_code.test.jsonl", encoding="utf-8")]
    texts = [t for t in texts if 6000 < len(t) < 12000][: args.docs]
    with tempfile.TemporaryDirectory() as logs:
        lm = TTTNNLM(k=args.k, max_length=args.max_length, max_neighbor_tokens=args.cap, log_dir=logs,
                     device="cpu", batch_size=1)
        requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
        for t in texts:  # warm the neighbour cache and the allocator; retrieval is timed below
            lm.retriever.retrieve(t, args.k)
        start = time.perf_counter()
        ours = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        ours_wall = time.perf_counter() - start
        records = [json.loads(l) for l in open(lm.log_path, encoding="utf-8")]
    bare = sum(bare_compute(lm, t, lm.retriever.retrieve(t, args.k).texts) for t in texts)
    saved_state = copy.deepcopy(lm.model.state_dict())
    start = time.perf_counter()
    reference = [reference_loop(lm, t, lm.retriever.retrieve(t, args.k).texts, saved_state) for t in texts]
    reference_wall = time.perf_counter() - start

    n_bytes = sum(len(t.encode()) for t in texts)
    bpb = lambda lls: -sum(lls) / n_bytes / math.log(2)  # noqa: E731
    split = {key: sum(r[key] for r in records) / len(records) for key in ("retrieve_s", "train_s", "score_s", "reset_s")}
    print_table(f"{len(texts)} documents ({n_bytes} bytes), k={args.k}, max_length={args.max_length}, "
                f"max_neighbor_tokens={args.cap}; seconds per document",
                ["retrieve", "train", "score", "reset", "total"],
                [[round(v, 3) for v in split.values()] + [round(ours_wall / len(texts), 3)]])
    print_table("side by side (same documents, same neighbours, same steps)",
                ["loop", "wall s", "bits/byte", "vs ttt-nn"],
                [["bare compute", round(bare, 2), "-", round(bare / ours_wall, 3)],
                 ["ttt-nn", round(ours_wall, 2), round(bpb(ours), 6), 1.0],
                 ["reference-style", round(reference_wall, 2), round(bpb(reference), 6), round(reference_wall / ours_wall, 2)]])
    print(f"\noverhead of ttt-nn over bare compute: {ours_wall / bare:.3f}x (goal <= 1.10x)")
    print(f"speed-up over the reference-style loop: {reference_wall / ours_wall:.2f}x (goal >= 3x)")
    print(f"final bits per byte, relative difference: {abs(bpb(ours) - bpb(reference)) / bpb(reference):.2e}")


if __name__ == "__main__":
    main()
