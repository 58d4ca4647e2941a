"""``--model ttt-nn``: HFLM that trains on each document's nearest neighbours before scoring it.

Per ``loglikelihood_rolling`` request, one document at a time:
retrieve k neighbours -> one AdamW step per chunk, nearest first (or farthest first) ->
score with HFLM's own rolling log-likelihood in eval mode -> restore weights and optimizer.
With k = 0 nothing is trained and the scores are HFLM's, bit for bit.

Every finished document is appended to a JSONL log (neighbour ids, distances, losses, the
log-likelihood at each k of ``eval_at_k``, timings) whose name is a hash of every setting
that changes a score; a rerun with the same settings reads finished documents from it, so
an interrupted run resumes where it stopped and reports identical numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from .assets import bundled_lm_path, ensure_default_index, ttt_home
from .retriever import Retriever, RetrieverConfig, text_key
from .ttt import TestTimeTrainer, TTTConfig, default_lr

ORDERS = ("nearest", "farthest")
QUERIES = ("full", "prefix")


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _as_int_or_none(value) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    number = int(float(value))  # lm-eval hands "-1" over as -1.0
    return None if number < 0 else number


def parse_eval_at_k(value, k: int) -> list[int]:
    """``"0:1:5"`` -> [0, 1, 5, k] (colons: lm-eval splits model_args on commas)."""
    if value is None or value == "":
        return [k]
    points = sorted({int(float(v)) for v in str(value).replace(",", ":").split(":") if v != ""} | {k})
    if points[0] < 0 or points[-1] > k:
        raise ValueError(f"eval_at_k values must lie in [0, k={k}], got {value!r}")
    return points


@dataclass(frozen=True)
class RunSettings:
    """Everything that changes a score; hashed into the log file name."""

    model: str
    index_identity: str
    k: int
    lr: float
    max_length: int
    max_neighbor_tokens: int | None
    order: str
    query: str
    exclude_duplicates: bool
    reset_optimizer: bool
    seed: int
    eval_at_k: tuple[int, ...]
    dtype: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class TTTNNLM(HFLM):
    def __init__(
        self,
        pretrained: str | None = None,
        index: str | None = None,
        k: int = 20,
        lr: float | None = None,
        max_neighbor_tokens: int | None = None,
        order: str = "nearest",
        query: str = "full",
        exclude_duplicates: bool = False,
        reset_optimizer: bool = True,
        eval_at_k: str | None = None,
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
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
        self.query = query
        self.k = _as_int_or_none(k) or 0
        self.order = order
        self.eval_at_k = parse_eval_at_k(eval_at_k, self.k)
        self.resume = _as_bool(resume)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.ttt_config = TTTConfig(
            lr=float(lr) if lr is not None else default_lr(n_params),
            max_length=self.max_length,
            max_neighbor_tokens=_as_int_or_none(max_neighbor_tokens),
            reset_optimizer=_as_bool(reset_optimizer),
            seed=int(float(seed)),
        )
        self.trainer = TestTimeTrainer(self.model, self.ttt_config)
        self.retriever = Retriever(
            RetrieverConfig(
                index=str(index) if index is not None else str(ensure_default_index()),
                failure_policy=failure_policy,
                timeout_s=float(retrieval_timeout),
                cache_dir=Path(neighbour_cache) if neighbour_cache else ttt_home() / "neighbour-cache",
                exclude_duplicates=_as_bool(exclude_duplicates),
                device=str(self.device),
            )
        )
        self.settings = RunSettings(
            model=str(pretrained),
            index_identity=self.retriever.manifest.identity,
            k=self.k,
            lr=self.ttt_config.lr,
            max_length=self.max_length,
            max_neighbor_tokens=self.ttt_config.max_neighbor_tokens,
            order=order,
            query=query,
            exclude_duplicates=self.retriever.config.exclude_duplicates,
            reset_optimizer=self.ttt_config.reset_optimizer,
            seed=self.ttt_config.seed,
            eval_at_k=tuple(self.eval_at_k),
            dtype=str(dtype),
        )
        self.log_path = Path(log_dir) / f"ttt-nn-{self.settings.key()}.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.with_suffix(".settings.json").write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    def _finished(self) -> dict[str, dict]:
        if not (self.resume and self.log_path.is_file()):
            return {}
        with open(self.log_path, encoding="utf-8") as f:
            return {r["doc_hash"]: r for r in map(json.loads, filter(str.strip, f))}

    def _score(self, request: Instance) -> float:
        return HFLM.loglikelihood_rolling(self, [request], disable_tqdm=True)[0]

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

    def adapt_and_score(self, request: Instance) -> dict:
        """Retrieve, train, score at each k of ``eval_at_k``, reset. Returns the log record."""
        text = request.args[0]
        timings = {"retrieve_s": 0.0, "train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
        t = time.perf_counter()
        neighbours = self.retriever.retrieve(self.query_text(request), self.k)
        timings["retrieve_s"] = time.perf_counter() - t
        tokens = [self.tokenizer(n, add_special_tokens=False).input_ids for n in neighbours.texts]
        if self.order == "farthest":
            tokens = tokens[::-1]
        scores, losses, done = {}, [], 0
        try:
            for point in self.eval_at_k:
                t = time.perf_counter()
                losses += self.trainer.train(tokens[done:point])
                done = point
                timings["train_s"] += time.perf_counter() - t
                t = time.perf_counter()
                scores[str(min(point, len(tokens)))] = self._score(request)
                timings["score_s"] += time.perf_counter() - t
        finally:
            t = time.perf_counter()
            self.trainer.reset()
            timings["reset_s"] = time.perf_counter() - t
        return {
            "doc_hash": text_key(text),
            "loglikelihood": scores[str(min(self.k, len(tokens)))],
            "loglikelihood_at_k": scores,
            "neighbour_ids": neighbours.ids,
            "distances": neighbours.distances,
            "missing_shards": neighbours.missing_shards,
            "excluded_duplicates": neighbours.excluded_duplicates,
            "neighbours_found": len(neighbours.ids),
            "chunk_losses": losses,
            "train_steps": sum(map(len, losses)),
            "bytes": len(text.encode("utf-8")),
            **timings,
        }

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        finished = self._finished()
        results = []
        with open(self.log_path, "a", encoding="utf-8") as log:
            for request in tqdm(requests, desc=f"ttt-nn k={self.k}", disable=disable_tqdm or self.rank != 0):
                record = finished.get(text_key(request.args[0]))
                if record is None:
                    record = self.adapt_and_score(request)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    finished[record["doc_hash"]] = record
                results.append(record["loglikelihood"])
                self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), record["loglikelihood"])
        return results
