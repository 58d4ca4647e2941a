"""Common base of every ttt-nn harness model: documents retrieved for, scored, logged, resumed.

``NeighbourLM`` is an HFLM that adds one concern, as lm-eval's ``hf_steered`` does: it owns,
for every request type the harness sends (``documents.KINDS``), the loop

    group requests into documents -> skip documents already in the log -> retrieve every
    remaining document's neighbours up front (batched) -> per document (or batch of
    documents): the method scores it given its neighbours -> log it -> answer the harness

Methods (ttt-nn and its baselines) only say how to score documents given neighbours
(``score_document``, or ``score_documents`` for a batch), using ``answers`` for the
harness's own answers with the current weights (their token pairs scored by HFLM or by the
method, or generated). Everything that makes numbers comparable and trustworthy lives here once: the
settings identity (every argument that can change a score, HFLM's included, derived from
the constructor's arguments), the per-document log and resume, refusing ``--use_cache``
(keyed on request text only), the harness seed, one batch-size detection, and rank-local
scoring: no collective inside a document, so data-parallel ranks with uneven shares,
padding copies or resumed documents cannot deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import time
import warnings
import weakref
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from index_server.index import spec_problem

from .assets import bundled_lm_path, ensure_default_index, ttt_home
from .documents import GENERATE, KINDS, LOGLIKELIHOOD, REQUEST_TYPES, ROLLING, Document, Pairs, group_documents, scatter
from .metrics import utf8_bytes
from .retriever import Neighbours, Retriever
from .runlog import RunLog, global_rank, is_degraded, rank_files, read_log
from .settings import (
    ALIASES,
    ModelArgumentError,
    NeighbourSettings,
    RunSettings,
    hf_scoring_values,
    parse_model_args,
    scoring_values,
)
from .tunerecord import TuneRecord, TuneRecordError

LOG_FORMAT = 2  # bump when the meaning of a logged score changes
# Every record carries what its document cost, in one shape for every method (what the
# method did not spend stays 0): TrainWork.record()'s fields, scoring, reset and retrieval.
NO_COST = {"train_steps": 0, "train_tokens": 0, "train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
log = logging.getLogger("lm_eval_ttt")


def harness_output_path() -> Path | None:
    """``--output_path`` of the running evaluation, when the model is built inside lm-eval's
    ``simple_evaluate``. lm-eval hands a model no output path (``create_from_arg_string``
    passes batch size and device only), so this reads the ``evaluation_tracker`` argument
    of the ``simple_evaluate`` call on the stack, that function's and no other's."""
    from lm_eval import evaluator

    code = inspect.unwrap(evaluator.simple_evaluate).__code__
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    path = getattr(frame.f_locals.get("evaluation_tracker"), "output_path", None) if frame is not None else None
    if not path:
        return None
    path = Path(path)
    return path.parent if path.suffix == ".json" else path


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return a == b


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
    setting_groups: tuple[type, ...] = (RunSettings, NeighbourSettings)  # a method without neighbours drops the 2nd
    request_types: tuple[str, ...] = REQUEST_TYPES

    def __init__(self, pretrained=None, retriever: Retriever | None = None, **kwargs) -> None:
        harness_seed = torch.initial_seed()  # --seed's torch seed, set before the model is built
        self._warned_k = False
        groups, hf_kwargs = parse_model_args(self.setting_groups, kwargs)  # errors before any loading
        self.settings_groups = groups
        self.run_settings: RunSettings = self.settings_of(RunSettings)
        self.neighbour_settings: NeighbourSettings | None = self.settings_of(NeighbourSettings)
        self.check_settings(hf_kwargs)
        hf_kwargs = {**hf_kwargs, **self.implied_hf_kwargs()}
        s = self.neighbour_settings
        if retriever is not None and (s is None or s.index is not None):
            raise ModelArgumentError("pass either index= or an already built retriever, not both")
        if not isinstance(pretrained, (str, type(None), Path)) and hf_kwargs.get("tokenizer") is None:
            raise ModelArgumentError("a model object needs its tokenizer object: tokenizer=...")
        self._hf_kwargs = dict(hf_kwargs)
        self._pretrained_name = str(pretrained) if isinstance(pretrained, (str, Path)) else None
        pretrained = str(bundled_lm_path()) if pretrained is None else pretrained
        if isinstance(pretrained, Path):
            pretrained = str(pretrained)
        self._pretrained_loaded = pretrained if isinstance(pretrained, str) else None  # `ttt-nn report` pairs by it
        output = harness_output_path()
        log_dir = self.run_settings.log_dir
        self.log_dir = Path(log_dir) if log_dir else (output / "ttt-nn-logs" if output else Path("ttt-nn-logs"))
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self._model_fingerprint = model_fingerprint(self.model)  # before any method adds adapters
        self.seed = self.run_settings.seed if self.run_settings.seed is not None else harness_seed
        self.k = s.k if s is not None else 0
        self.retriever = retriever
        self._close = None  # closes the retriever this model opened (an injected one is its owner's)
        if self.retriever is None and self.needs_retriever():
            self.retriever = self.open_retriever(s)
            self._close = weakref.finalize(self, self.retriever.close)  # at the latest when collected or at exit
        self._identity: dict | None = None
        self._summary = {"scored": 0, "resumed": 0, "degraded": 0}

    # -- settings -------------------------------------------------------------------------
    def check_settings(self, hf_kwargs: dict) -> None:
        """Reject invalid combinations before the model loads (subclasses extend); reads,
        never changes, the HFLM arguments."""
        s = self.neighbour_settings
        if s is not None and s.alpha is not None and s.select != "sift":
            raise ModelArgumentError("alpha (adaptive compute) needs select=sift")
        if s is not None and s.index is not None and (problem := spec_problem(s.index)):
            raise ModelArgumentError(f"index={problem}")
        self._read_tuned()

    def implied_hf_kwargs(self) -> dict:
        """HFLM arguments the method's settings imply (training precision: scoring autocast)."""
        return {}

    def settings_of(self, group: type):
        return next((g for g in self.settings_groups if isinstance(g, group)), None)

    def needs_retriever(self) -> bool:
        """Whether the method opens the index (asked once the model is loaded)."""
        return self.k > 0

    def open_retriever(self, s: NeighbourSettings) -> Retriever:
        cache = Path(s.neighbour_cache) if s.neighbour_cache else ttt_home() / "neighbour-cache"
        spec = s.index if s.index is not None else str(ensure_default_index())
        return Retriever.open(dataclasses.replace(s, index=spec), cache, device=str(self.device))

    def identity(self) -> dict:
        """Everything that can change a score; its hash names the log."""
        return {
            "format": LOG_FORMAT,
            "method": self.method,
            "pretrained": self._pretrained_name,
            "model": self._model_fingerprint,
            "tokenizer": [getattr(self.tokenizer, "name_or_path", None), len(self.tokenizer)],
            "hf": hf_scoring_values(self._hf_kwargs),
            "max_length": self.max_length,
            "index": self.retriever.signature if self.retriever is not None else None,
            **{k: v for g in self.settings_groups for k, v in scoring_values(g).items()},
            "seed": self.seed,  # after the groups: RunSettings.seed is None when the harness's --seed applies
        }

    def _identity_json(self) -> str:
        """The identity, fixed at first use (after subclasses finished setting the model up)."""
        if self._identity is None:
            self._identity = json.loads(json.dumps(self.identity(), sort_keys=True, default=str))
        return json.dumps(self._identity, sort_keys=True)

    @property
    def log_stem(self) -> Path:
        return self.log_dir / f"{self.method}-{hashlib.sha256(self._identity_json().encode()).hexdigest()[:16]}"

    def _read_tuned(self) -> TuneRecord | None:
        """The tune record of ``tuned=``, checked as far as the arguments alone allow (before
        the model loads); ``tuned()`` checks the value actually used."""
        path = self.run_settings.tuned
        if path is None:
            return None
        try:
            record = TuneRecord.read(Path(path))
        except TuneRecordError as e:
            raise ModelArgumentError(f"tuned={e}") from e
        name = ALIASES.get(record.param, record.param)
        given = next((getattr(g, name) for g in self.settings_groups if hasattr(g, name)), None)
        if record.method != self.method or (given is not None and not _same(given, record.value)):
            raise ModelArgumentError(f"tuned={path} chose {record.param}={record.value} for {record.method}, but "
                                     f"this run is {self.method} with {record.param}={given}")
        k = self.neighbour_settings.k if self.neighbour_settings is not None else None
        if record.k is not None and k is not None and record.k != k and not self._warned_k:
            self._warned_k = True  # a value chosen at one k need not hold at another
            warnings.warn(f"tuned={path}: {record.param}={record.value} was tuned at k={record.k}; this run uses "
                          f"k={k}", UserWarning, stacklevel=2)
        return record

    def tuned(self) -> dict | None:
        """What the results record of ``tuned=``: which value, tuned on which validation
        documents or given. Refuses a record of another method or whose value this run does
        not use."""
        record = self._read_tuned()
        if record is None:
            return None
        used = json.loads(self._identity_json()).get(ALIASES.get(record.param, record.param))
        if used is None or not _same(used, record.value):
            raise ModelArgumentError(f"tuned={self.run_settings.tuned} chose {record.param}={record.value} for "
                                     f"{record.method}, but this run is {self.method} with {record.param}={used}")
        return {"param": record.param, "value": record.value, "k": record.k, "source": record.source,
                "reason": record.reason, "file": str(self.run_settings.tuned), "describe": record.describe(),
                "validation": dataclasses.asdict(record.validation) if record.validation else None}

    def close(self) -> None:
        """Close the index connections and corpus files this model opened (idempotent)."""
        if self._close is not None:
            self._close()

    def get_model_info(self) -> dict:
        """Lands in the harness results JSON: the log files, the settings, and degraded documents."""
        records = read_log(self.log_stem).values()
        degraded = [r for r in records if is_degraded(r)]
        return {**super().get_model_info(), "ttt_nn": {
            "log_files": [str(p.resolve()) for p in rank_files(self.log_stem)],
            "settings_file": str(RunLog.settings_path_of(self.log_stem).resolve()),
            "pretrained": self._pretrained_loaded,
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
                pairs.append(([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1],
                                                                                                     cont[1:]))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return pairs

    def answers(self, document: Document, score=None, window: int | None = None, context: list[int] = ()) -> list:
        """The harness's answers to the document's requests with the current weights.

        Likelihood requests: the document's token pairs (a rolling text's windows of at most
        ``window`` tokens, a question's choices), each context preceded by the ``context``
        tokens, scored by ``score(pairs)`` (default: HFLM's own scoring). Generation: each
        prompt after the text of ``context``, generated with its gen_kwargs."""
        kind = document.kind
        if kind.pairs is None:
            prefix = self.tok_decode(list(context), skip_special_tokens=False) if context else ""
            requests = [Instance(r.request_type, r.doc, (prefix + r.args[0], *r.args[1:]), r.idx, r.metadata)
                        for r in document.requests] if prefix else document.requests
            return HFLM.generate_until(self, requests, disable_tqdm=True)
        pairs: Pairs = [(list(context) + ctx, cont) for ctx, cont in kind.pairs(self, document, window)]
        return kind.fold((score or self.score_windows)(pairs))

    # -- what methods implement ------------------------------------------------------------
    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        """Log fields of one document; ``results`` holds one answer per document request."""
        raise NotImplementedError

    def score_documents(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """A batch of documents (one unless the method batches, e.g. LoRA doc_batch)."""
        return [self.score_document(d, n) for d, n in zip(documents, neighbours)]

    def document_batches(self, documents: list[Document]) -> list[list[Document]]:
        return [[d] for d in documents]

    def training_order(self, neighbours: Neighbours) -> Neighbours:
        """The neighbours in the order the method uses them (and logs them)."""
        return neighbours

    @contextlib.contextmanager
    def document_rng(self, documents: list[Document]):
        """Randomness (dropout, sampling) seeded from the run's seed and the documents, so a
        document scores the same in any order, on any rank, and when resumed; the harness's
        own random state is left as it was."""
        key = hashlib.sha256(f"{self.seed}:{','.join(d.key for d in documents)}".encode()).digest()
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int.from_bytes(key[:8], "little"))
            yield

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
        if self.neighbour_settings is None:
            return Neighbours([], [], [], stop_reason=f"no retrieval: {self.method} uses no neighbours"), 0.0
        if self.retriever is None or self.k == 0:
            return Neighbours([], [], [], stop_reason="k=0: nothing retrieved"), 0.0
        query = document.query(self.neighbour_settings.query)
        found = self.retriever.neighbours(query, self.k, self.exclude_ids(document))
        return self.training_order(found), time.perf_counter() - start

    def _prefetch(self, documents: list[Document]) -> None:
        if not documents or not self._retrieves():
            return
        excluded = max(len(self.exclude_ids(d)) for d in documents)
        self.prefetch([d.query(self.neighbour_settings.query) for d in documents], excluded, progress=self.rank == 0)

    def _retrieves(self) -> bool:
        return self.retriever is not None and self.k > 0

    def prefetch(self, queries: list[str], excluded: int = 0, progress: bool = False) -> None:
        """Retrieve the neighbours of these query texts up front, in batched searches, as the
        loop does before scoring its documents (``excluded``: the most ids a document drops);
        nothing when this model retrieves no neighbours (k=0, or no retriever)."""
        if not queries or not self._retrieves():
            return
        stats = self.retriever.prefetch(queries, self.retriever.fetch_k(self.k, excluded),
                                        batch=self.neighbour_settings.retrieval_batch, progress=progress)
        log.info("ttt-nn: retrieved %d queries up front in %.1f s", stats["searched"], stats["seconds"])

    def _run(self, request_type: str, requests: list[Instance], disable_tqdm: bool) -> list:
        if request_type not in self.request_types:
            raise NotImplementedError(
                f"--model {self.method} cannot answer {request_type} requests (supports: "
                f"{', '.join(self.request_types)}); run those tasks with another model")
        self.tuned()  # a tuned= that does not match the value used fails before any work
        documents = group_documents(request_type, requests)
        if documents:
            self._fix_batch_size()
        degraded = []
        stem = self.log_stem
        with RunLog(stem.parent, stem.name, json.loads(self._identity_json()), global_rank(self.rank)) as run_log:
            finished = run_log.finished(self.run_settings.resume)
            todo = [d for d in documents if d.key not in finished]
            self._summary["resumed"] += len(documents) - len(todo)
            self._prefetch(todo)
            what = f"{self.method} k={self.k}" if self.neighbour_settings is not None else self.method
            with tqdm(total=len(todo), desc=f"{what} {request_type}",
                      disable=disable_tqdm or self.rank != 0 or not todo) as bar:
                for batch in self.document_batches(todo):
                    found = [self._neighbours(d) for d in batch]
                    try:
                        with self.document_rng(batch):
                            records = self.score_documents(batch, [n for n, _ in found])
                    except Exception as e:
                        e.add_note(f"while scoring {request_type} documents "
                                   f"{', '.join(f'{d.task} doc_id={d.doc_id}' for d in batch)}")
                        raise
                    for document, (neighbours, seconds), record in zip(batch, found, records):
                        record = {"doc_key": document.key, "request_type": request_type, "task": document.task,
                                  "doc_id": document.doc_id, "bytes": utf8_bytes([document.text]),
                                  # the harness scores a repeated request (same text) once per copy
                                  **({"copies": len(document.positions[0])} if len(document.positions[0]) > 1
                                     else {}),
                                  **neighbours.record(), **NO_COST, "retrieve_s": seconds, **record}
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
        return [KINDS[request_type].to_harness(a) for a in scatter(documents, answers, len(requests))]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._run(ROLLING, requests, disable_tqdm)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._run(LOGLIKELIHOOD, requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._run(GENERATE, requests, disable_tqdm)
