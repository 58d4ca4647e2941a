"""The trainer a method drives: the ``Trainer`` contract and the work it reports.

Every method that trains at test time (``ttt-nn`` on neighbours and, with
``dyneval_iterations``, on the document's own windows; ``ttt-nn-dyneval``) calls a
``Trainer``, whatever it updates: every weight or the top blocks (``ttt.TestTimeTrainer``),
one document's LoRA adapters (the same class over a peft model), or many documents' adapters
at once (``lora.BatchedLoRATrainer``). ``trainers.build_trainer`` picks one from the settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class TrainWork:
    """What a trainer spent on one document since its last reset."""

    steps: int = 0  # optimizer steps taken
    skipped: int = 0  # fp16 steps the gradient scaler skipped on overflow (not taken, not in ``steps``)
    tokens: int = 0  # tokens trained on (forward and backward)
    seconds: float = 0.0  # wall time of its training calls (shared steps split between their documents)

    def add(self, steps: int, skipped: int, tokens: int, seconds: float) -> None:
        self.steps += steps - skipped
        self.skipped += skipped
        self.tokens += tokens
        self.seconds += seconds

    def record(self) -> dict:
        """The log fields of this work, one shape for every method."""
        return {"train_steps": self.steps, **({"skipped_steps": self.skipped} if self.skipped else {}),
                "train_tokens": self.tokens, "train_s": self.seconds}


@runtime_checkable
class Trainer(Protocol):
    """Test-time training of up to ``slots`` documents at once, each with its own weights."""

    slots: int  # documents trained at once

    @property
    def lr(self) -> float:
        """The configured learning rate."""
        ...

    def train(self, documents: Sequence[Sequence[Sequence[int]]], lr: float | None = None) -> list[list[list[float]]]:
        """Train slot i on ``documents[i]``: token sequences in training order, each cut into
        chunks of at most ``max_length`` tokens (shorter than 2: skipped), one optimizer step
        per chunk (or per ``neighbour_batch`` chunks), at ``lr`` if given. Returns, per
        document and sequence, the chunk losses (nats per token). Dropout is on while
        training; the caller seeds the randomness."""
        ...

    def weights(self, slots: int | Sequence[int]) -> contextlib.AbstractContextManager:
        """Forward passes inside use the weights of slot ``slots[i]`` for batch row i (an
        int: for every row)."""
        ...

    def work(self) -> list[TrainWork]:
        """Per slot, what training cost since the last reset."""
        ...

    def reset(self) -> None:
        """Every slot back to the original weights and a fresh optimizer state (unless
        ``reset_optimizer=false`` keeps Adam's moments, the reference code's leak), its work
        counted from zero."""
        ...


