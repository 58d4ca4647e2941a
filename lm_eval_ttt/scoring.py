"""Continuation log-likelihoods computed as HFLM computes them, for methods that must change
something HFLM's own loop does not let them reach: a per-row adapter (LoRA ``doc_batch``) or
the next-token distribution itself (interpolation with the neighbours' histogram).

Same inputs as ``HFLM._loglikelihood_tokens``: the last ``max_length + 1`` tokens of context +
continuation minus the final one, right padding within a batch (causal attention keeps real
tokens blind to the padding after them), the log-softmax at the continuation's positions,
greedy = every continuation token is the argmax. Plain scoring keeps using HFLM itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def continuation_scores(lm, pairs: Sequence[tuple[list[int], list[int]]], batch: int,
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        rows: Callable[[list[int]], contextlib.AbstractContextManager] | None = None,
                        ) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) per (context, continuation). ``transform`` maps a row's
    continuation log-probabilities (tokens x vocabulary) to others (still log-probabilities);
    ``rows(indices)`` wraps the forward pass of the batch holding ``pairs[indices]``."""
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    autocast = dict(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                    enabled=lm.mixed_precision_dtype is not None)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            inputs = [(pairs[i][0] + pairs[i][1])[-(lm.max_length + 1) :][:-1] for i in chunk]
            ids = torch.zeros((len(inputs), max(map(len, inputs))), dtype=torch.long, device=lm.device)
            for row, tokens in enumerate(inputs):
                ids[row, : len(tokens)] = torch.tensor(tokens)
            with (rows(chunk) if rows else contextlib.nullcontext()), torch.autocast(**autocast):
                logits = lm.model(ids).logits
            for row, i in enumerate(chunk):
                cont = pairs[i][1]
                end = len(inputs[row])
                logprobs = F.log_softmax(logits[row, end - len(cont) : end], dim=-1, dtype=lm.softmax_dtype)
                if transform is not None:
                    logprobs = transform(logprobs)
                targets = torch.tensor(cont, device=lm.device)
                out[i] = (float(logprobs.gather(1, targets[:, None]).sum()),
                          bool((logprobs.argmax(-1) == targets).all()))
    return out
