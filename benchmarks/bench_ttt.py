"""Where the time of a TTT-NN document goes, against the physical limit: the bare model calls.

Usage: python benchmarks/bench_ttt.py [--device cpu] [--docs 4] [--k 10] [--max-length 256] [--cap 128]
                                      [--synthetic] [--precision fp32] [--repeats 2] [--json PATH]
                                      [--experiment TOML] [--configs LABELS] [--documents JSONL]

Three measurements on the same documents, in one run:
1. ttt-nn as the harness runs it, per document: retrieval, training (forward + backward +
   optimizer), scoring, reset, and everything else (wall minus those), from its own log.
2. The pure compute inside it: the same forward+backward+step calls on the same chunks and
   forward passes over the same scoring windows, nothing else (its training and scoring are
   reported apart, and the gradient clipping the model adds is timed on its own, outside the
   pure compute). Every part of (1) is reported as a ratio to it; overhead = (1) / (2), goal
   <= 1.10x. (1) and (2) alternate document by document (ABBA order, ``--repeats`` rounds), so
   a machine whose speed drifts during the run shifts both alike.
3. A reference-style loop (socialfoundations/tttlm): weights restored with load_state_dict
   from a deep copy, the document re-scored after every neighbour with the full
   log-softmax copied to the CPU. Speed-up = (3) / (1); the final bits per byte agree.
4. Configurations: seconds per document and bits per byte of every ``ttt-nn`` method of an
   experiment file (``--experiment``, default ``docs/experiments/bundled.toml``; ``--configs``
   picks labels) on the same documents, its speed-up over (3), and the cheapest one whose bits
   per byte is at least as good as (3)'s (to 1e-6 relative: ``--default``, the configuration
   that loop mirrors, equals it to rounding). Each runs with the method's declared arguments at
   the values the experiment's tune records hold (``ttt-nn compare``), or ``--chosen
   LABEL=VALUE`` where no record is on this machine, without its curve's extra scoring passes
   (``eval_at_k``); the neighbour cap and the documents are the benchmark's, k the method's
   where it declares one (else ``--k``); (1) to (3) run the ``--default`` configuration's.

Everything runs on the experiment's index and model (``[experiment] index``/``pretrained``;
the bundled ones where it names none), so experts built for that index run as its methods do.
The documents are the first ``--docs`` of 6,000 to 12,000 characters in ``--documents`` (a
JSONL of texts; default: the bundled test split).

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
from lm_eval.utils import simple_parse_args_string  # noqa: E402

from lm_eval_ttt.documents import ROLLING  # noqa: E402
from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes  # noqa: E402
from lm_eval_ttt.model import TTTNNLM  # noqa: E402
from lm_eval_ttt.runlog import read_log  # noqa: E402
from lm_eval_ttt.ttt import chunk_tokens, make_adamw  # noqa: E402

# The paper's seconds per neighbour on one A100 (GPT-2 117M, GPT-2-large 774M), 1024-token
# chunks, including one re-scoring of the document per neighbour.
PAPER_SECONDS_PER_NEIGHBOUR = {"GPT-2 117M (A100)": 5.45, "GPT-2-large 774M (A100)": 18.7}
# Set by the benchmark (its documents, k, neighbours and logs), or a curve's scoring passes.
BENCH_SETS = {"pretrained", "index", "max_length", "max_neighbor_tokens", "log_dir", "tuned", "eval_at_k", "device",
              "batch_size"}
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


def pure_compute(lm: TTTNNLM, text: str, neighbour_texts: list[str], device: str) -> tuple[float, float, float]:
    """(training seconds, scoring seconds) of the bare model calls on the same inputs, and the
    seconds of the gradient clipping the model adds to each step (timed apart, not in either)."""
    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, lm.trainer.config)
    chunks = [c for t in neighbour_texts for c in chunk_tokens(
        lm.tokenizer(t, add_special_tokens=False).input_ids, lm.max_length, lm.ttt_settings.max_neighbor_tokens)]
    inputs = [torch.tensor([ctx + cont], device=device) for ctx, cont in lm.windows(text)]
    clip = lm.trainer.config.grad_clip
    sync(device)
    start, clipping = time.perf_counter(), 0.0
    model.train()
    for chunk in chunks:
        ids = torch.tensor([chunk], device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            sync(device)
            clip_start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, clip)
            sync(device)
            clipping += time.perf_counter() - clip_start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    sync(device)
    train = time.perf_counter() - start - clipping
    start = time.perf_counter()
    with torch.no_grad():
        for ids in inputs:
            model(ids)
    sync(device)
    score = time.perf_counter() - start
    lm.trainer.reset()
    return train, score, clipping


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
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of ttt-nn and pure compute alternating over the documents (default: %(default)s)")
    p.add_argument("--experiment", type=Path, default=Path("docs/experiments/bundled.toml"),
                   help="experiment file whose ttt-nn methods are the configurations (default: %(default)s)")
    p.add_argument("--configs", help="labels of the experiment's methods to compare (default: every ttt-nn method)")
    p.add_argument("--default", default="nearest",
                   help="the configuration the reference-style loop mirrors (default: %(default)s)")
    p.add_argument("--chosen", nargs="*", default=[], metavar="LABEL=VALUE",
                   help="values for tunes whose records are not on this machine (e.g. nearest=1e-4)")
    p.add_argument("--documents", type=Path, help="JSONL of texts to score (default: the bundled test split)")
    args = p.parse_args()
    if any("=" not in kv for kv in args.chosen):
        p.error(f"--chosen takes LABEL=VALUE pairs, got {args.chosen}")
    from lm_eval_ttt.experiment import load

    experiment = load(args.experiment)
    configs = configurations(experiment, args.configs.split(",") if args.configs else None,
                             dict(kv.split("=", 1) for kv in args.chosen))
    if args.default not in configs:
        p.error(f"--default {args.default!r} is not among the configurations {', '.join(configs)}")
    configs = {args.default: configs.pop(args.default), **configs}
    from lm_eval_ttt.assets import bundled_lm_path

    documents = args.documents or bundled_corpus() / "stdlib_code.test.jsonl"
    texts = [json.loads(line)["text"] for line in open(documents, encoding="utf-8")]
    texts = [t for t in texts if 6000 < len(t) < 12000][: args.docs]
    if not texts:
        p.error(f"{documents}: no document of 6,000 to 12,000 characters")
    requests = [Instance(ROLLING, {}, (t,), i) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as logs:
        index = experiment.index
        if args.synthetic:
            from transformers import AutoTokenizer

            index = str(synthetic_index(AutoTokenizer.from_pretrained(bundled_lm_path()), args.max_length))
        model = {"pretrained": experiment.pretrained} if experiment.pretrained else {}
        base = dict(**model, k=args.k, max_length=args.max_length, max_neighbor_tokens=args.cap, index=index,
                    log_dir=logs, neighbour_cache=str(Path(logs) / "cache"), device=args.device, batch_size=1, seed=1,
                    precision=args.precision, dtype="float32")
        lm = TTTNNLM(**{**base, **configs[args.default]})
        lm.prefetch(texts)  # as the base loop does
        lm.loglikelihood_rolling(requests[:1], disable_tqdm=True)  # warm-up: allocator, kernels
        neighbours = {t: lm.retriever.neighbours(t, lm.k).texts for t in texts}  # the configuration's k
        ours, records, ours_wall, pure = {}, [], 0.0, []
        for round_ in range(args.repeats):
            for i, request in enumerate(requests):
                for which in (("ttt-nn", "pure") if (i + round_) % 2 == 0 else ("pure", "ttt-nn")):
                    if which == "pure":
                        pure.append(pure_compute(lm, texts[i], neighbours[texts[i]], args.device))
                        continue
                    for f in Path(logs).glob("*.jsonl"):  # scored again from scratch, not resumed
                        f.unlink()
                    sync(args.device)
                    start = time.perf_counter()
                    ours[i] = lm.loglikelihood_rolling([request], disable_tqdm=True)[0]
                    sync(args.device)
                    ours_wall += time.perf_counter() - start
                    records += read_log(lm.log_stem).values()
        ours = [ours[i] for i in range(len(requests))]
    calls = args.repeats * len(texts)  # documents scored by each of the two, all rounds together
    pure_train, pure_score, clipping = (sum(x[j] for x in pure) for j in range(3))
    pure_total = pure_train + pure_score
    parts = {key: sum(r[key] for r in records) for key in ("retrieve_s", "train_s", "score_s", "reset_s")}
    parts["other_s"] = ours_wall - sum(parts.values())
    n_neighbours = sum(len(r["neighbour_ids"]) for r in records)
    rows = [[name, round(seconds / calls, 4), round(seconds / pure_total, 4)] for name, seconds in
            (("forward+backward+optimizer", parts["train_s"]), ("scoring", parts["score_s"]),
             ("retrieval", parts["retrieve_s"]), ("reset", parts["reset_s"]), ("everything else", parts["other_s"]),
             ("total (ttt-nn)", ours_wall), ("pure compute", pure_total),
             ("pure: forward+backward+optimizer", pure_train), ("pure: scoring", pure_score),
             ("gradient clipping (in ttt-nn's training, not in pure)", clipping))]
    out = report(f"{len(texts)} documents x {args.repeats} rounds, k={lm.k}, max_length={args.max_length}, "
                 f"max_neighbor_tokens={args.cap}, "
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
        speedup = (reference_wall / len(texts)) / (ours_wall / calls)
        print(f"speed-up over the reference-style loop: {speedup:.2f}x; final bits "
              f"per byte {ours_bpb:.6f} vs {ref_bpb:.6f} (relative difference {abs(ours_bpb - ref_bpb) / ref_bpb:.1e})")
        out.append({"part": "reference-style loop", "seconds_per_document": reference_wall / len(texts),
                    "ratio_to_pure_compute": (reference_wall / len(texts)) / (pure_total / calls), "speedup": speedup,
                    "bits_per_byte": ref_bpb})
        measured = {args.default: (lm.trainer.lr, ours_wall / calls, ours_bpb)}  # measured above: not run twice
        out += compare_configs(configs, base, requests, texts, reference_wall / len(texts), ref_bpb, args.device,
                               measured)
    write_json(args.json, out)


def configurations(experiment, labels: list[str] | None, chosen: dict[str, str]) -> dict[str, dict]:
    """label -> model arguments of the experiment's ttt-nn methods: declared, with the values
    their tune records hold (or ``chosen``), without what the benchmark sets itself."""
    from lm_eval_ttt.compare import Comparison

    comparison = Comparison(experiment, chosen, write=False)  # the benchmark leaves the experiment's records alone
    out = {}
    for m in experiment.methods:
        if m.model != "ttt-nn" or (labels is not None and m.label not in labels):
            continue
        args = comparison.run_args(m)
        if args is None:
            raise SystemExit(f"{m.label}: no tune record under {experiment.out} and no --chosen value for it or the "
                             f"tunes it takes values from ({', '.join(m.needs())})")
        args = simple_parse_args_string(args)
        out[m.label] = {k: v for k, v in args.items() if k not in BENCH_SETS}
    return out


def time_config(base: dict, args: dict, name: str, requests, texts, device: str) -> tuple[float, float, float]:
    """(neighbour steps' lr, seconds per document, bits per byte) of one configuration: wall time, retrieval up
    front as the base loop does, after a warm-up document."""
    lm = TTTNNLM(**{**base, **args, "log_dir": f"{base['log_dir']}/{name}"})
    lm.prefetch(texts)
    lm.loglikelihood_rolling(requests[:1], disable_tqdm=True)  # warm-up, then scored again from scratch
    for f in Path(base["log_dir"], name).glob("*.jsonl"):
        f.unlink()
    sync(device)
    start = time.perf_counter()
    bpb = bits_per_byte(lm.loglikelihood_rolling(requests, disable_tqdm=True), utf8_bytes(texts))
    sync(device)
    seconds = (time.perf_counter() - start) / len(texts)
    lm.close()
    return (lm.trainer.lr if lm.k else None), seconds, bpb  # the neighbour steps' rate; none without neighbours


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
           f"{reference_bpb:.6f} bits per byte", ["configuration", "arguments", "neighbour lr", "s/doc", "bits/byte",
                                                  "x reference", "as good"],
           [list(r.values()) for r in rows])
    default = rows[0] if rows else None  # the configuration the reference loop mirrors
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
