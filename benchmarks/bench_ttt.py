"""Where the time of a TTT-NN document goes, against the physical limit: the bare model calls.

Usage: python benchmarks/bench_ttt.py [--device cpu] [--docs 4] [--k 10] [--max-length 256] [--cap 128]
                                      [--synthetic] [--precision fp32] [--json PATH]

Three measurements on the same documents, in one run:
1. ttt-nn as the harness runs it, per document: retrieval, training (forward + backward +
   optimizer), scoring, reset, and everything else (wall minus those), from its own log.
2. The pure compute inside it: the same forward+backward+step calls on the same chunks and
   forward passes over the same scoring windows, nothing else. Every part of (1) is
   reported as a ratio to it; overhead = (1) / (2), goal <= 1.10x.
3. A reference-style loop (socialfoundations/tttlm): weights restored with load_state_dict
   from a deep copy, the document re-scored after every neighbour with the full
   log-softmax copied to the CPU. Speed-up = (3) / (1); the final bits per byte agree.
4. Configurations (``--configs``): seconds per document and bits per byte of each on the
   same documents, its speed-up over (3), and the cheapest one whose bits per byte is at
   least as good as (3)'s (to 1e-6 relative: the default equals it to rounding). Each runs at
   the rate ``docs/compare.sh`` chose for it on validation documents when ``--compare DIR``
   holds that tune (else at the default rate); the reference loop runs at the default
   configuration's rate.

``--synthetic`` trains on synthetic neighbours of exactly ``--max-length`` tokens (random
token ids, indexed like any corpus) instead of the bundled code neighbours: the paper's
setting for seconds per neighbour (``benchmarks/gpu.sh``: 1024-token chunks, k=20).
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, bundled_corpus, parser, report, write_json  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from lm_eval_ttt.documents import ROLLING  # noqa: E402
from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes  # noqa: E402
from lm_eval_ttt.model import TTTNNLM  # noqa: E402
from lm_eval_ttt.runlog import read_log  # noqa: E402
from lm_eval_ttt.ttt import chunk_tokens, make_adamw  # noqa: E402

# The paper's seconds per neighbour on one A100 (GPT-2 117M, GPT-2-large 774M), 1024-token
# chunks, including one re-scoring of the document per neighbour.
PAPER_SECONDS_PER_NEIGHBOUR = {"GPT-2 117M (A100)": 5.45, "GPT-2-large 774M (A100)": 18.7}
# name -> (model arguments, the docs/compare.sh tunes whose chosen values it takes: {argument: tune})
CONFIGS = {
    "default": ({}, {"lr": "ttt-nn"}),
    "train_layers=6": ({"train_layers": 6}, {"lr": "top"}),
    "lora": ({"adapter": "lora"}, {"lr": "lora"}),
    "neighbour_batch=4": ({"neighbour_batch": 4}, {"lr": "ttt-nn"}),
    "k=5": ({"k": 5}, {"lr": "k5"}),
    "combined": ({"dyneval_iterations": 1}, {"lr": "ttt-nn", "dyneval_lr": "combined"}),
    "train_layers=6 k=5 combined": ({"train_layers": 6, "k": 5, "dyneval_iterations": 1},
                                    {"lr": "top", "dyneval_lr": "top-combined"}),
}
SAME_BPB = 1e-6  # relative: the default configuration reproduces the reference loop up to float rounding


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_index(tokenizer, tokens: int, n: int = 64) -> Path:
    """A real index over n documents of ``tokens`` random token ids each."""
    from index_server.build import BuildConfig, build_index

    out = WORK / f"ttt-synthetic-{tokens}"
    if (out / "manifest.json").is_file():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    corpus = WORK / f"ttt-synthetic-{tokens}.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(n):
            ids = torch.randint(100, tokenizer.vocab_size - 100, (tokens,), generator=generator).tolist()
            f.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")
    build_index(BuildConfig(output=out, corpus=(corpus,), overwrite=True, progress=False))
    return out


def pure_compute(lm: TTTNNLM, text: str, neighbour_texts: list[str], device: str) -> tuple[float, float]:
    """(training seconds, scoring seconds) of the bare model calls on the same inputs."""
    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, lm.trainer.config)
    chunks = [c for t in neighbour_texts for c in chunk_tokens(
        lm.tokenizer(t, add_special_tokens=False).input_ids, lm.max_length, lm.ttt_settings.max_neighbor_tokens)]
    inputs = [torch.tensor([ctx + cont], device=device) for ctx, cont in lm.windows(text)]
    sync(device)
    start = time.perf_counter()
    model.train()
    for chunk in chunks:
        ids = torch.tensor([chunk], device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    sync(device)
    train = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for ids in inputs:
            model(ids)
    sync(device)
    score = time.perf_counter() - start
    lm.trainer.reset()
    return train, score


def reference_loop(lm: TTTNNLM, text: str, neighbour_texts: list[str], saved_state: dict, device: str) -> float:
    """Returns the final log-likelihood; scores after every neighbour as the reference did."""
    model, params = lm.model, [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lm.trainer.config.lr, eps=1e-8, weight_decay=0.01)

    def score() -> float:
        total = 0.0
        with torch.no_grad():
            for ctx, cont in lm.windows(text):
                ids = torch.tensor([(ctx + cont)[:-1]], device=device)
                logprobs = torch.log_softmax(model(ids).logits, dim=-1).cpu()  # whole vocabulary to the CPU
                targets = torch.tensor(cont)
                total += logprobs[0, -len(cont):].gather(1, targets[:, None]).sum().item()
        return total

    ll = score()
    torch.manual_seed(lm.seed)  # the reference seeded once per document too (the model has no dropout)
    for neighbour in neighbour_texts:
        model.train()
        for chunk in chunk_tokens(lm.tokenizer(neighbour, add_special_tokens=False).input_ids,
                                  lm.max_length, lm.ttt_settings.max_neighbor_tokens):
            ids = torch.tensor([chunk], device=device)
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
    p = parser(__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--cap", type=int, default=128, help="max_neighbor_tokens (default: %(default)s)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--synthetic", action="store_true", help="synthetic neighbours of exactly --max-length tokens")
    p.add_argument("--skip-reference", action="store_true", help="skip the reference-style loop")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations to compare, of {', '.join(CONFIGS)}")
    p.add_argument("--compare", type=Path, default=Path("work/compare"),
                   help="docs/compare.sh output whose tunes give each configuration its rate (default: %(default)s)")
    p.add_argument("--chosen", nargs="*", default=[], metavar="TUNE=VALUE",
                   help="values docs/compare.sh was given by CHOSEN= for tunes it did not run (e.g. ttt-nn=1e-4)")
    args = p.parse_args()
    if any("=" not in kv for kv in args.chosen):
        p.error(f"--chosen takes TUNE=VALUE pairs, got {args.chosen}")
    given = dict(kv.split("=", 1) for kv in args.chosen)
    configs = {name: resolve(name, args.compare, given) for name in args.configs.split(",") if name}
    from lm_eval_ttt.assets import bundled_lm_path

    texts = [json.loads(line)["text"] for line in open(bundled_corpus() / "stdlib_code.test.jsonl", encoding="utf-8")]
    texts = [t for t in texts if 6000 < len(t) < 12000][: args.docs]
    requests = [Instance(ROLLING, {}, (t,), i) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as logs:
        index = None
        if args.synthetic:
            from transformers import AutoTokenizer

            index = str(synthetic_index(AutoTokenizer.from_pretrained(bundled_lm_path()), args.max_length))
        base = dict(k=args.k, max_length=args.max_length, max_neighbor_tokens=args.cap, index=index, log_dir=logs,
                    neighbour_cache=str(Path(logs) / "cache"), device=args.device, batch_size=1, seed=1,
                    precision=args.precision, dtype="float32")
        lm = TTTNNLM(**base, **configs.get("default", {}))
        lm.retriever.prefetch(texts, lm.retriever.fetch_k(args.k), progress=False)  # as the base loop does
        lm.loglikelihood_rolling(requests[:1], disable_tqdm=True)  # warm-up: allocator, kernels
        for f in Path(logs).glob("*.jsonl"):
            f.unlink()
        sync(args.device)
        start = time.perf_counter()
        ours = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        sync(args.device)
        ours_wall = time.perf_counter() - start
        records = list(read_log(lm.log_stem).values())
    neighbours = {t: lm.retriever.neighbours(t, args.k).texts for t in texts}
    pure = [pure_compute(lm, t, neighbours[t], args.device) for t in texts]
    pure_train, pure_score = sum(x for x, _ in pure), sum(y for _, y in pure)
    pure_total = pure_train + pure_score
    parts = {key: sum(r[key] for r in records) for key in ("retrieve_s", "train_s", "score_s", "reset_s")}
    parts["other_s"] = ours_wall - sum(parts.values())
    n_neighbours = sum(len(r["neighbour_ids"]) for r in records)
    rows = [[name, round(seconds / len(texts), 4), round(seconds / pure_total, 4)] for name, seconds in
            (("forward+backward+optimizer", parts["train_s"]), ("scoring", parts["score_s"]),
             ("retrieval", parts["retrieve_s"]), ("reset", parts["reset_s"]), ("everything else", parts["other_s"]),
             ("total (ttt-nn)", ours_wall), ("pure compute", pure_total))]
    out = report(f"{len(texts)} documents, k={args.k}, max_length={args.max_length}, max_neighbor_tokens={args.cap}, "
                 f"{args.device}, {args.precision}{', synthetic neighbours' if args.synthetic else ''}; "
                 "seconds per document and ratio to the pure compute", ["part", "s/doc", "x pure compute"], rows,
                 ["part", "seconds_per_document", "ratio_to_pure_compute"])
    seconds_per_neighbour = parts["train_s"] / max(1, n_neighbours)
    print(f"\ntraining seconds per neighbour: {seconds_per_neighbour:.3f} ({args.device}); paper: "
          + ", ".join(f"{k} {v} s" for k, v in PAPER_SECONDS_PER_NEIGHBOUR.items()))
    print(f"overhead of ttt-nn over pure compute: {ours_wall / pure_total:.3f}x (goal <= 1.10x)")
    out.append({"part": "seconds_per_neighbour", "seconds_per_document": seconds_per_neighbour,
                "ratio_to_pure_compute": None, "overhead": ours_wall / pure_total})
    if not args.skip_reference:
        saved_state = copy.deepcopy(lm.model.state_dict())
        sync(args.device)
        start = time.perf_counter()
        reference = [reference_loop(lm, t, neighbours[t], saved_state, args.device) for t in texts]
        sync(args.device)
        reference_wall = time.perf_counter() - start
        n_bytes = utf8_bytes(texts)
        ours_bpb, ref_bpb = bits_per_byte(ours, n_bytes), bits_per_byte(reference, n_bytes)
        print(f"speed-up over the reference-style loop: {reference_wall / ours_wall:.2f}x; final bits "
              f"per byte {ours_bpb:.6f} vs {ref_bpb:.6f} (relative difference {abs(ours_bpb - ref_bpb) / ref_bpb:.1e})")
        out.append({"part": "reference-style loop", "seconds_per_document": reference_wall / len(texts),
                    "ratio_to_pure_compute": reference_wall / pure_total, "speedup": reference_wall / ours_wall,
                    "bits_per_byte": ref_bpb})
        measured = {"default": (lm.trainer.lr, ours_wall / len(texts), ours_bpb)}  # measured above: not run twice
        out += compare_configs(configs, base, requests, texts, reference_wall / len(texts), ref_bpb, args.device,
                               measured)
    write_json(args.json, out)


def resolve(name: str, compare: Path, given: dict[str, str]) -> dict:
    """A configuration's model arguments, with the values docs/compare.sh chose for it (its
    tune.json, else the value it was given)."""
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}; one of {', '.join(CONFIGS)}")
    args, tunes = CONFIGS[name]
    chosen = {}
    for argument, tune in tunes.items():
        path = compare / "tune" / tune / "tune.json"
        if path.is_file():
            chosen[argument] = json.loads(path.read_text())["chosen"]
        elif tune in given:
            chosen[argument] = float(given[tune])
    return {**args, **chosen}


def time_config(base: dict, args: dict, name: str, requests, texts, device: str) -> tuple[float, float, float]:
    """(lr, seconds per document, bits per byte) of one configuration: wall time, retrieval up
    front as the base loop does, after a warm-up document."""
    lm = TTTNNLM(**{**base, **args, "log_dir": f"{base['log_dir']}/{name}"})
    lm.retriever.prefetch(texts, lm.retriever.fetch_k(lm.k), progress=False)
    lm.loglikelihood_rolling(requests[:1], disable_tqdm=True)  # warm-up, then scored again from scratch
    for f in Path(base["log_dir"], name).glob("*.jsonl"):
        f.unlink()
    sync(device)
    start = time.perf_counter()
    bpb = bits_per_byte(lm.loglikelihood_rolling(requests, disable_tqdm=True), utf8_bytes(texts))
    sync(device)
    seconds = (time.perf_counter() - start) / len(texts)
    lm.close()
    return lm.trainer.lr, seconds, bpb


def compare_configs(configs: dict, base: dict, requests, texts, reference_s: float, reference_bpb: float,
                    device: str, measured: dict) -> list[dict]:
    """Seconds per document and bits per byte of every configuration on the documents,
    against the reference-style loop."""
    rows = []
    for name, args in configs.items():
        lr, seconds, bpb = measured.get(name) or time_config(base, args, name, requests, texts, device)
        rows.append({"configuration": name, "arguments": json.dumps(args, sort_keys=True), "lr": lr,
                     "seconds_per_document": round(seconds, 3), "bits_per_byte": round(bpb, 6),
                     "speedup_over_reference": round(reference_s / seconds, 2),
                     "as_good_as_reference": bpb <= reference_bpb * (1 + SAME_BPB)})
    report(f"configurations on the same documents; the reference-style loop: {reference_s:.2f} s/doc, "
           f"{reference_bpb:.6f} bits per byte", ["configuration", "arguments", "lr", "s/doc", "bits/byte",
                                                  "x reference", "as good"],
           [list(r.values()) for r in rows])
    default = next((r for r in rows if r["configuration"] == "default"), None)
    good = [r for r in rows if r["as_good_as_reference"]]
    cheapest = min(good, key=lambda r: r["seconds_per_document"]) if good else None
    if default:
        print(f"default: {default['speedup_over_reference']}x fewer seconds per document than the reference loop")
    print("cheapest configuration at least as good as the reference loop: "
          + (f"{cheapest['configuration']}, {cheapest['speedup_over_reference']}x (target >= 10x)" if cheapest else
             "none"))
    summary = {"configuration": "cheapest as good as the reference", "of": cheapest and cheapest["configuration"],
               "speedup_over_reference": cheapest and cheapest["speedup_over_reference"]}
    return [{"part": "configuration", **r} for r in rows] + [{"part": "summary", **summary}]


if __name__ == "__main__":
    main()
