"""The test-time training loop: one AdamW step per neighbour chunk, then an exact reset.

Per document: ``train(neighbour_texts)`` takes the neighbours in the given order, cuts each
into non-overlapping chunks of ``max_length`` tokens (capped at ``max_neighbor_tokens``),
and takes one step per chunk; ``reset()`` copies the original weights back in place and
empties the optimizer state. The snapshot is one flat copy of the parameters taken once;
no module deepcopy and no reload from disk, so a reset costs one memcpy of the weights.

Fixes of the reference loop: the optimizer no longer leaks Adam moments from one document
into the next (``reset_optimizer=False`` brings the leak back for comparison), neighbours
can be capped, and a trailing chunk of fewer than 2 tokens (no next-token label, NaN loss)
is skipped instead of stepping on NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_CHUNK_TOKENS = 2
LARGE_MODEL_PARAMS = 1_000_000_000


def default_lr(n_params: int) -> float:
    """The paper's constant learning rates: 2e-5 up to GPT-2-large, 5e-6 from 1.3B on."""
    return 2e-5 if n_params < LARGE_MODEL_PARAMS else 5e-6


@dataclass(frozen=True)
class TTTConfig:
    lr: float
    max_length: int  # tokens per training chunk (the scoring window too)
    max_neighbor_tokens: int | None = None  # cap per neighbour; None trains on all of it
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0
    reset_optimizer: bool = True
    seed: int = 1234


def chunk_tokens(token_ids: Sequence[int], max_length: int, cap: int | None = None) -> list[list[int]]:
    """Non-overlapping chunks of ``max_length``; chunks shorter than 2 tokens are dropped."""
    ids = list(token_ids[:cap] if cap is not None else token_ids)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [c for c in chunks if len(c) >= MIN_CHUNK_TOKENS]


class TestTimeTrainer:
    __test__ = False  # not a pytest class

    def __init__(self, model: torch.nn.Module, config: TTTConfig):
        self.model = model
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self._snapshot = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay
        )
        self.device = next(model.parameters()).device

    def step(self, chunk: Sequence[int]) -> float:
        """One optimizer step on one chunk (labels = inputs). Returns the loss in nats/token."""
        inputs = torch.tensor([list(chunk)], device=self.device)
        with torch.enable_grad():
            loss = self.model(input_ids=inputs, labels=inputs).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite training loss {loss.item()} on a {len(chunk)}-token chunk")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    def train(self, neighbour_tokens: Sequence[Sequence[int]]) -> list[list[float]]:
        """Train on neighbours in the given order; returns per-neighbour chunk losses."""
        torch.manual_seed(self.config.seed)  # dropout masks: same document, same run
        self.model.train()
        try:
            return [
                [self.step(c) for c in chunk_tokens(tokens, self.config.max_length, self.config.max_neighbor_tokens)]
                for tokens in neighbour_tokens
            ]
        finally:
            self.model.eval()

    def reset(self) -> None:
        """Restore the original weights bit for bit and (by default) forget Adam's state."""
        with torch.no_grad():
            for p, saved in zip(self.params, self._snapshot):
                p.copy_(saved)
                p.grad = None
        if self.config.reset_optimizer:
            self.optimizer.state.clear()
