"""Common base of every ttt-nn harness model: documents retrieved for, scored, logged, resumed.

``NeighbourLM`` is an HFLM that adds one concern, as lm-eval's ``hf_steered`` does: it owns,
for every request type the harness sends (``loglikelihood_rolling``, ``loglikelihood``,
``generate_until``), the loop

    group requests into documents -> skip documents already in the log -> retrieve every
    remaining document's neighbours up front (batched) -> per document (or batch of
    documents): the method scores it given its neighbours -> log it -> answer the harness

Methods (ttt-nn and its baselines) only say how to score documents given neighbours
(``score_document``), using ``stock_results`` for the harness's own scoring with the current
weights. Everything that makes numbers comparable and trustworthy lives here once: the
settings identity (every argument that can change a score, HFLM's included, derived from
the constructor's arguments), the per-document log and resume, refusing ``--use_cache``
(keyed on request text only), the harness seed, one batch-size detection, and rank-local
scoring: no collective inside a document, so data-parallel ranks with uneven shares,
padding copies or resumed documents cannot deadlock.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from index_server.options import IndexOptions

from .assets import bundled_lm_path, ensure_default_index, ttt_home
from .documents import REQUEST_TYPES, Document, group_documents, scatter
from .retriever import Neighbours, Retriever, SelectionConfig
from .runlog import RunLog, global_rank, read_log
from .settings import (ALIASES, ModelArgumentError, NeighbourSettings, hf_scoring_values, parse_model_args,
                       scoring_values)

LOG_FORMAT = 2  # bump when the meaning of a logged score changes
log = logging.getLogger("lm_eval_ttt")


def harness_output_path() -> Path | None:
    """``--output_path`` of the running evaluation, when the model is built inside
    ``simple_evaluate`` (its ``evaluation_tracker`` is on the call stack then)."""
    frame = inspect.currentframe()
    while frame is not None:
        tracker = frame.f_locals.get("evaluation_tracker")
        path = getattr(tracker, "output_path", None)
        if path:
            path = Path(path)
            return path.parent if path.suffix == ".json" else path
        frame = frame.f_back
    return None


def model_fingerprint(model: torch.nn.Module) -> str:
    """Config plus the first values of every tensor: different weights, different hash."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        head = tensor.detach().reshape(-1)[:16].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:32]


class NeighbourLM(HFLM):
    """Base of ttt-nn and its baselines; see the module docstring."""

    method = "base"
    setting_groups: tuple[type, ...] = (NeighbourSettings,)
    request_types: tuple[str, ...] = REQUEST_TYPES
    uses_retrieval = True

    def __init__(self, pretrained=None, retriever: Retriever | None = None, **kwargs) -> None:
        harness_seed = torch.initial_seed()  # --seed's torch seed, set before the model is built
        groups, hf_kwargs = parse_model_args(self.setting_groups, kwargs)  # errors before any loading
        self.settings_groups = groups
        self.neighbour_settings: NeighbourSettings = groups[0]
        self.check_settings(hf_kwargs)
        s = self.neighbour_settings
        if retriever is not None and s.index is not None:
            raise ModelArgumentError("pass either index= or an already built retriever, not both")
        if not isinstance(pretrained, (str, type(None), Path)) and hf_kwargs.get("tokenizer") is None:
            raise ModelArgumentError("a model object needs its tokenizer object: tokenizer=...")
        self._hf_kwargs = dict(hf_kwargs)
        self._pretrained_name = str(pretrained) if isinstance(pretrained, (str, Path)) else None
        pretrained = str(bundled_lm_path()) if pretrained is None else pretrained
        if isinstance(pretrained, Path):
            pretrained = str(pretrained)
        output = harness_output_path()
        self.log_dir = Path(s.log_dir) if s.log_dir else (output / "ttt-nn-logs" if output else Path("ttt-nn-logs"))
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self._model_fingerprint = model_fingerprint(self.model)  # before any method adds adapters
        self.seed = s.seed if s.seed is not None else harness_seed
        self.k = s.k if self.uses_retrieval else 0
        self.retriever = retriever
        if self.retriever is None and self.uses_retrieval and self.k > 0:
            self.retriever = self.open_retriever(s)
        self._identity: dict | None = None
        self._summary = {"scored": 0, "resumed": 0, "degraded": 0}

    # -- settings -------------------------------------------------------------------------
    def check_settings(self, hf_kwargs: dict) -> None:
        """Reject invalid combinations before the model loads (subclasses extend)."""
        s = self.neighbour_settings
        if s.alpha is not None and s.select != "sift":
            raise ModelArgumentError("alpha (adaptive compute) needs select=sift")

    def settings_of(self, group: type):
        return next(g for g in self.settings_groups if isinstance(g, group))

    def open_retriever(self, s: NeighbourSettings) -> Retriever:
        options = IndexOptions(
            timeout_s=s.retrieval_timeout, failure_policy=s.failure_policy,
            token_file=Path(s.index_token_file) if s.index_token_file else None,
            tls_ca=Path(s.index_tls_ca) if s.index_tls_ca else None, nprobe=s.index_nprobe,
            ef_search=s.index_ef_search, corpus_root=Path(s.corpus_root) if s.corpus_root else None,
        )
        selection = SelectionConfig(select=s.select, candidates=s.candidates, sift_lambda=s.sift_lambda, alpha=s.alpha,
                                    max_distance=s.max_distance, exclude_duplicates=s.exclude_duplicates)
        cache = Path(s.neighbour_cache) if s.neighbour_cache else ttt_home() / "neighbour-cache"
        spec = s.index if s.index is not None else str(ensure_default_index())
        return Retriever.open(spec, options, selection, cache, device=str(self.device))

    def identity(self) -> dict:
        """Everything that can change a score; its hash names the log."""
        index = None
        if self.retriever is not None:
            options = getattr(self.retriever.index, "options", IndexOptions())
            index = {"identity": self.retriever.manifest.identity, "nprobe": options.nprobe,
                     "ef_search": options.ef_search, "refine_factor": options.refine_factor}
        return {
            "format": LOG_FORMAT,
            "method": self.method,
            "pretrained": self._pretrained_name,
            "model": self._model_fingerprint,
            "tokenizer": [getattr(self.tokenizer, "name_or_path", None), len(self.tokenizer)],
            "hf": hf_scoring_values(self._hf_kwargs),
            "max_length": self.max_length,
            "seed": self.seed,
            "index": index,
            **{k: v for g in self.settings_groups for k, v in scoring_values(g).items()},
        }

    def _identity_json(self) -> str:
        """The identity, fixed at first use (after subclasses finished setting the model up)."""
        if self._identity is None:
            self._identity = json.loads(json.dumps(self.identity(), sort_keys=True, default=str))
        return json.dumps(self._identity, sort_keys=True)

    @property
    def log_stem(self) -> Path:
        return self.log_dir / f"{self.method}-{hashlib.sha256(self._identity_json().encode()).hexdigest()[:16]}"

    def tuned(self) -> dict | None:
        """The ``tuned=`` record: which value was chosen on which validation documents.
        Refuses a tune.json of another method or whose chosen value this run does not use."""
        path = self.neighbour_settings.tuned
        if path is None:
            return None
        try:
            data = json.loads(Path(path).read_text())
            param, chosen = ALIASES.get(data["param"], data["param"]), data["chosen"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelArgumentError(f"tuned={path}: not a tune.json written by `ttt-nn tune` ({e})") from e
        used = json.loads(self._identity_json()).get(param)
        if data["method"] != self.method or used is None or not math.isclose(float(used), float(chosen), rel_tol=1e-9):
            raise ModelArgumentError(f"tuned={path} chose {data['param']}={chosen} for {data['method']}, but this run is "
                                     f"{self.method} with {data['param']}={used}")
        return {"param": data["param"], "value": chosen, "reason": data.get("reason"), "file": str(path),
                "validation": data["validation"]}

    def get_model_info(self) -> dict:
        """Lands in the harness results JSON: the log, the settings, and degraded documents."""
        records = read_log(self.log_stem).values()
        degraded = [r for r in records if r.get("missing_shards")]
        return {**super().get_model_info(), "ttt_nn": {
            "log": str(self.log_stem.resolve()),
            "settings": json.loads(self._identity_json()),
            "documents_in_log": len(records),
            "this_process": dict(self._summary),
            "degraded_documents": len(degraded),
            "missing_shards": sorted({s for r in degraded for s in r["missing_shards"]}),
            "tuned": self.tuned(),
        }}

    def set_cache_hook(self, cache_hook) -> None:
        if getattr(cache_hook, "dbdict", None) is not None:
            raise ValueError(
                f"--use_cache is refused for --model {self.method}: the harness keys its cache on the request text "
                f"only, so a run with other settings (another k, lr, index) would get stale scores. ttt-nn keeps its "
                f"own per-document log keyed on every setting instead (resume=true, log_dir=...)")
        super().set_cache_hook(cache_hook)

    # -- scoring with the current weights ------------------------------------------------
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

    def score_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """HFLM's token scoring of (context, continuation) pairs, batched as HFLM batches a
        rolling document: rank-local (no collective) and without progress bars."""
        out = []
        for i in range(0, len(windows), self.batch_size):
            batch = [(None, ctx, cont) for ctx, cont in windows[i : i + self.batch_size]]
            out += self._loglikelihood_tokens(batch, disable_tqdm=True, override_bs=len(batch))
        return out

    def encode_pairs(self, document: Document) -> list[tuple[list[int], list[int]]]:
        """Token (context, continuation) of each loglikelihood request, exactly as HFLM
        encodes them (an empty context becomes the prefix token)."""
        pairs = []
        for context, continuation in (r.args for r in document.requests):
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                pairs.append(([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:]))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return pairs

    def stock_results(self, document: Document) -> list:
        """The harness's answers for the document's requests with the current weights."""
        if document.request_type == "loglikelihood_rolling":
            return [sum(ll for ll, _ in self.score_windows(self.windows(document.text)))]
        if document.request_type == "loglikelihood":
            return [list(r) for r in self.score_windows(self.encode_pairs(document))]
        return HFLM.generate_until(self, document.requests, disable_tqdm=True)

    # -- what methods implement ------------------------------------------------------------
    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        """Log fields of one document; ``results`` holds one answer per document request."""
        raise NotImplementedError

    def score_documents(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """A batch of documents (one unless the method batches, e.g. LoRA doc_batch)."""
        return [self.score_document(d, n) for d, n in zip(documents, neighbours)]

    def document_batches(self, documents: list[Document]) -> list[list[Document]]:
        return [[d] for d in documents]

    # -- the loop ---------------------------------------------------------------------------
    def exclude_ids(self, document: Document) -> frozenset[int]:
        """Corpus ids a document must not retrieve: its own, for validation documents drawn
        from the index's corpus (``ttt_nn_corpus_id`` in the task's document)."""
        own = (document.doc or {}).get("ttt_nn_corpus_id")
        return frozenset([int(own)]) if own is not None else frozenset()

    def _fix_batch_size(self) -> None:
        """``batch_size=auto`` is detected once per model, not once per document."""
        if str(self.batch_size_per_gpu).startswith("auto"):
            self.batch_size_per_gpu = self._detect_batch_size()
            self.batch_sizes[0] = self.batch_size_per_gpu
            log.info("ttt-nn: batch size %d for this run", self.batch_size_per_gpu)

    def _neighbours(self, document: Document) -> tuple[Neighbours, float]:
        start = time.perf_counter()
        if self.retriever is None or self.k == 0:
            return Neighbours([], [], []), 0.0
        query = document.query(self.neighbour_settings.query)
        return self.retriever.neighbours(query, self.k, self.exclude_ids(document)), time.perf_counter() - start

    def _prefetch(self, documents: list[Document]) -> None:
        if self.retriever is None or self.k == 0 or not documents:
            return
        excluded = max(len(self.exclude_ids(d)) for d in documents)
        queries = [d.query(self.neighbour_settings.query) for d in documents]
        stats = self.retriever.prefetch(queries, self.retriever.fetch_k(self.k, excluded),
                                        batch=self.neighbour_settings.retrieval_batch, progress=self.rank == 0)
        log.info("ttt-nn: retrieved %d queries up front in %.1f s", stats["searched"], stats["seconds"])

    def _run(self, request_type: str, requests: list[Instance], disable_tqdm: bool) -> list:
        if request_type not in self.request_types:
            raise NotImplementedError(
                f"--model {self.method} cannot answer {request_type} requests (supports: "
                f"{', '.join(self.request_types)}); run those tasks with another model")
        self.tuned()  # a wrong tuned= fails before any work
        documents = group_documents(request_type, requests)
        if documents:
            self._fix_batch_size()
        degraded = []
        stem = self.log_stem
        with RunLog(stem.parent, stem.name, json.loads(self._identity_json()), global_rank(self.rank)) as run_log:
            finished = run_log.finished(self.neighbour_settings.resume)
            todo = [d for d in documents if d.key not in finished]
            self._summary["resumed"] += len(documents) - len(todo)
            self._prefetch(todo)
            with tqdm(total=len(todo), desc=f"{self.method} k={self.k} {request_type}",
                      disable=disable_tqdm or self.rank != 0 or not todo) as bar:
                for batch in self.document_batches(todo):
                    found = [self._neighbours(d) for d in batch]
                    records = self.score_documents(batch, [n for n, _ in found])
                    for document, (neighbours, seconds), record in zip(batch, found, records):
                        record = {"doc_key": document.key, "request_type": request_type, "task": document.task,
                                  "doc_id": document.doc_id, "bytes": len(document.text.encode("utf-8")),
                                  **neighbours.record(), "retrieve_s": seconds, **record}
                        run_log.append(record)
                        finished[document.key] = record
                        self._summary["scored"] += 1
                        if neighbours.missing_shards:
                            degraded.append(neighbours.missing_shards)
                    bar.update(len(batch))
        if degraded:
            self._summary["degraded"] += len(degraded)
            log.warning("ttt-nn: %d of %d documents were scored from degraded retrievals (shards %s down); they are "
                        "logged as such and will be scored again by the next run", len(degraded), len(documents),
                        sorted({s for m in degraded for s in m}))
        answers = [finished[d.key]["results"] for d in documents]
        out = scatter(documents, answers, len(requests))
        if request_type == "loglikelihood":
            out = [tuple(a) for a in out]
        for request, answer in zip(requests, out):
            self.cache_hook.add_partial(request_type, request.args, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._run("loglikelihood_rolling", requests, disable_tqdm)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._run("loglikelihood", requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._run("generate_until", requests, disable_tqdm)
