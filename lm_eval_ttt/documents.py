"""Harness requests grouped into documents, and what each request type means for one.

A document is the unit that is retrieved for, trained on, scored together, logged and
resumed. ``KINDS`` says once, per request type, how its requests group, what retrieval
sees, which token pairs answer it and how their scores become the harness's answers:

* ``loglikelihood_rolling``: one document per text; answered by the summed log-likelihood of
  HFLM's disjoint rolling windows (every token scored once).
* ``loglikelihood``: all requests of one ``(task, doc_id)`` (the choices of one question share
  their context): retrieval sees the context, training happens once, every choice is scored.
* ``generate_until``: one document per request (a task's repeats and the evaluator's padding
  copies are the same instance: greedy ones are generated once, sampled ones each time);
  answered by generating.

The evaluator pads a data-parallel rank's list with copies of its last request; they fall in
the same document as their original and are answered from it without scoring again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lm_eval.api.instance import Instance

ROLLING, LOGLIKELIHOOD, GENERATE = "loglikelihood_rolling", "loglikelihood", "generate_until"
Pairs = list[tuple[list[int], list[int]]]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def args_key(request_type: str, args: list) -> str:
    return text_key(json.dumps([request_type, args], sort_keys=True, default=str))


@dataclass(frozen=True)
class RequestKind:
    """One request type, as the base loop and every method handle it."""

    name: str
    # (request, its position in the call) -> the document it belongs to
    group: Callable[[Instance, int], object]
    # The token (context, continuation) pairs that answer a document: ``pairs(lm, document,
    # window)`` with ``window`` the rolling window length (None: the model's); None for
    # requests answered by generating.
    pairs: Callable | None
    # Scores of those pairs, (log-likelihood, greedy) each, -> one answer per request.
    fold: Callable[[list[tuple[float, bool]]], list] | None
    # Its answer is the likelihood of the document's own text, window after window, so a
    # method can learn from the text once it is scored (dynamic evaluation).
    own_text: bool = False
    # Several requests (the choices of a question) with their own contexts: retrieval sees
    # what the contexts share.
    choices: bool = False
    to_harness: Callable[[object], object] = lambda answer: answer


def _rolling_pairs(lm, document: Document, window: int | None) -> Pairs:
    return lm.windows(document.text, window)


def _choice_pairs(lm, document: Document, window: int | None) -> Pairs:
    return lm.encode_pairs(document)


def _question(request: Instance, position: int):
    return (request.task_name, request.doc_id) if request.doc_id is not None else request.args[0]


def _prompt(request: Instance, position: int):
    return (request.task_name, request.doc_id, request.args[0]) if not _samples(request) else position


KINDS = {k.name: k for k in (
    RequestKind(ROLLING, lambda request, position: request.args[0], _rolling_pairs,
                lambda scores: [sum(ll for ll, _ in scores)], own_text=True),
    RequestKind(LOGLIKELIHOOD, _question, _choice_pairs, lambda scores: [list(x) for x in scores], choices=True,
                to_harness=tuple),
    RequestKind(GENERATE, _prompt, None, None),
)}
REQUEST_TYPES = tuple(KINDS)


@dataclass
class Document:
    request_type: str
    task: str | None
    doc_id: int | None
    requests: list[Instance] = field(default_factory=list)  # the ones to answer, first-seen order
    positions: list[list[int]] = field(default_factory=list)  # positions of each in the input list
    doc: dict | None = None
    occurrence: int = 0  # sampled generations of the same prompt: which repeat this is

    @property
    def kind(self) -> RequestKind:
        return KINDS[self.request_type]

    @property
    def key(self) -> str:
        return args_key(self.request_type, [list(r.args) for r in self.requests] + [self.occurrence])

    @property
    def text(self) -> str:
        """The scored text (rolling) or the shared context: what is shown and counted."""
        return self.requests[0].args[0]

    def query(self, mode: str) -> str:
        """What retrieval sees: the scored text or the shared context (its first continuation
        when the context is empty); under ``mode="prefix"`` a split task's ``prefix`` field."""
        if mode == "prefix":
            if not self.kind.own_text:
                raise ValueError("query=prefix applies to rolling (perplexity) tasks; other request types retrieve "
                                 "on their context")
            prefix = (self.doc or {}).get("prefix")
            if prefix is None:
                raise ValueError("query=prefix needs a split task whose documents carry a 'prefix' field "
                                 "(e.g. ttt_stdlib_code_split, or dataset_kwargs split_prefix: 0.5)")
            return prefix
        if self.kind.choices:
            # choices that fill a blank (winogrande) each bring their own context: their shared
            # beginning is the question
            contexts = [r.args[0] for r in self.requests]
            shared = os.path.commonprefix(contexts)
            return shared if shared.strip() else contexts[0] or self.requests[0].args[1]
        return self.requests[0].args[0]


def _samples(request: Instance) -> bool:
    """Whether HFLM generates this request by sampling (``_model_generate``'s rule: explicit
    ``do_sample``, else any non-zero temperature leaves it to the model's own config)."""
    if request.request_type != GENERATE:
        return False
    kwargs = request.args[1]
    if kwargs.get("do_sample") is not None:
        return bool(kwargs["do_sample"])
    return float(kwargs.get("temperature", 0.0)) != 0.0


def group_documents(request_type: str, requests: list[Instance]) -> list[Document]:
    """Documents in first-seen order; each request position belongs to exactly one."""
    documents: dict[object, Document] = {}
    seen: dict[str, int] = {}
    for position, request in enumerate(requests):
        group = KINDS[request_type].group(request, position)
        document = documents.get(group)
        if document is None:
            occurrence = 0
            if _samples(request):
                occurrence = seen[request.args[0]] = seen.get(request.args[0], -1) + 1
            document = documents[group] = Document(request_type, request.task_name, request.doc_id, doc=request.doc,
                                                   occurrence=occurrence)
        same = next((i for i, r in enumerate(document.requests) if r.args == request.args), None)
        if same is None or _samples(request):
            document.requests.append(request)
            document.positions.append([position])
        else:
            document.positions[same].append(position)
    return list(documents.values())


def scatter(documents: list[Document], results: list[list], n: int) -> list:
    """Per-document results (one per request of the document) back to input order."""
    out = [None] * n
    for document, answers in zip(documents, results):
        for positions, answer in zip(document.positions, answers):
            for position in positions:
                out[position] = answer
    return out
