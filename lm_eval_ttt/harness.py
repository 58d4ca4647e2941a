"""Common base of every ttt-nn harness model: one document at a time, logged and resumable.

``NeighbourLM`` is an HFLM that scores ``loglikelihood_rolling`` requests one document at
a time through ``score_document(request) -> record``. It owns what all methods share so
their numbers are comparable: the retriever and its neighbour cache (same index, same
neighbours), the per-document JSONL log named by a hash of every setting that changes a
score, and resume from that log. Subclasses add their own settings and scoring.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from .assets import bundled_lm_path, ensure_default_index, ttt_home
from .retriever import Neighbours, Retriever, RetrieverConfig, text_key
from .ttt import default_lr

QUERIES = ("full", "prefix")


def as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def as_int_or_none(value) -> int | None:
    """lm-eval hands "-1" over as -1.0 and "none" as None; negative means none."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    number = int(float(value))
    return None if number < 0 else number


class NeighbourLM(HFLM):
    """Base of ttt-nn and its baselines. ``uses_retrieval = False`` skips the index."""

    method = "base"
    uses_retrieval = True

    def __init__(
        self,
        pretrained: str | None = None,
        index: str | None = None,
        k: int = 20,
        query: str = "full",
        exclude_duplicates: bool = False,
        seed: int = 1234,
        failure_policy: str = "fail",
        retrieval_timeout: float = 30.0,
        neighbour_cache: str | None = None,
        log_dir: str = "ttt-nn-logs",
        resume: bool = True,
        dtype: str = "float32",
        **kwargs,
    ) -> None:
        pretrained = str(bundled_lm_path()) if pretrained is None else pretrained
        super().__init__(pretrained=pretrained, dtype=dtype, **kwargs)
        if query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
        self.k = (as_int_or_none(k) or 0) if self.uses_retrieval else 0
        self.query = query
        self.seed = int(float(seed))
        self.resume = as_bool(resume)
        self.retriever = None
        if self.uses_retrieval:
            self.retriever = Retriever(
                RetrieverConfig(
                    index=str(index) if index is not None else str(ensure_default_index()),
                    failure_policy=failure_policy,
                    timeout_s=float(retrieval_timeout),
                    cache_dir=Path(neighbour_cache) if neighbour_cache else ttt_home() / "neighbour-cache",
                    exclude_duplicates=as_bool(exclude_duplicates),
                    device=str(self.device),
                )
            )
        self._base_settings = {
            "method": self.method,
            "model": str(pretrained),
            "dtype": str(dtype),
            "max_length": self.max_length,
            "seed": self.seed,
            "index_identity": self.retriever.manifest.identity if self.retriever else None,
            "k": self.k,
            "query": query if self.retriever else None,
            "exclude_duplicates": self.retriever.config.exclude_duplicates if self.retriever else None,
        }
        self.log_dir = Path(log_dir)

    def learning_rate(self, lr: float | str | None) -> float:
        """The given lr, else the paper's default for this model's size."""
        return float(lr) if lr is not None else default_lr(sum(p.numel() for p in self.model.parameters()))

    # -- settings and log -------------------------------------------------------------------
    def method_settings(self) -> dict:
        """Settings of the subclass that change scores; part of the log file's hash."""
        return {}

    @property
    def settings(self) -> dict:
        return {**self._base_settings, **self.method_settings()}

    @property
    def log_path(self) -> Path:
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        return self.log_dir / f"{self.method}-{key}.jsonl"

    def get_model_info(self) -> dict:
        """Lands in the harness results JSON, so ``ttt-nn report`` can find the log."""
        return {**super().get_model_info(), "ttt_nn": {"log": str(self.log_path.resolve()), "settings": self.settings}}

    def _finished(self) -> dict[str, dict]:
        if not (self.resume and self.log_path.is_file()):
            return {}
        with open(self.log_path, encoding="utf-8") as f:
            return {r["doc_hash"]: r for r in map(json.loads, filter(str.strip, f))}

    # -- documents --------------------------------------------------------------------------
    def query_text(self, request: Instance) -> str:
        """What retrieval sees: the scored text, or under the split protocol its prefix."""
        if self.query == "full":
            return request.args[0]
        prefix = (request.doc or {}).get("prefix")
        if prefix is None:
            raise ValueError(
                "query=prefix needs a split task whose documents carry a 'prefix' field "
                "(e.g. ttt_stdlib_code_split, or dataset_kwargs split_prefix: 0.5)"
            )
        return prefix

    def neighbours(self, request: Instance) -> Neighbours:
        return self.retriever.retrieve(self.query_text(request), self.k) if self.k else Neighbours([], [], [])

    def windows(self, text: str, max_seq_len: int | None = None) -> list[tuple[list[int], list[int]]]:
        """HFLM's disjoint rolling windows (context, continuation): every token scored once."""
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=max_seq_len or self.max_length,
                context_len=1,
            )
        ]

    def hf_score(self, request: Instance) -> float:
        """The stock HFLM rolling log-likelihood of one document with the current weights."""
        return HFLM.loglikelihood_rolling(self, [request], disable_tqdm=True)[0]

    def score_document(self, request: Instance) -> dict:
        """Log record of one document; must hold ``loglikelihood``."""
        raise NotImplementedError

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        finished = self._finished()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.with_suffix(".settings.json").write_text(json.dumps(self.settings, indent=2) + "\n")
        results = []
        with open(self.log_path, "a", encoding="utf-8") as log:
            for request in tqdm(requests, desc=f"{self.method} k={self.k}", disable=disable_tqdm or self.rank != 0):
                doc_hash = text_key(request.args[0])
                record = finished.get(doc_hash)
                if record is None:
                    record = {"doc_hash": doc_hash, "bytes": len(request.args[0].encode("utf-8")),
                              **self.score_document(request)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    finished[doc_hash] = record
                results.append(record["loglikelihood"])
                self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), record["loglikelihood"])
        return results
