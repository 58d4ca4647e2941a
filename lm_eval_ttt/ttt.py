"""Full-weight test-time training of one document: one AdamW step per neighbour chunk, then an
exact reset. ``TestTimeTrainer`` is a ``trainer.Trainer`` with one slot.

Per document: ``train([sequences])`` takes the token sequences in the given order (the
caller caps a neighbour at ``max_neighbor_tokens``), cuts each into non-overlapping chunks of
``max_length`` tokens, and takes one step per chunk, or per ``neighbour_batch`` chunks padded
into one batch;
``reset()`` copies the original weights back in place and empties the optimizer state. The
snapshot is one copy of the trainable parameters (all of them, or the top blocks with
``train_layers``) taken once; no module deepcopy and no reload from disk, so a reset costs
one memcpy. A trailing chunk of fewer than 2 tokens has no next-token label (its loss would
be NaN) and is skipped.

Ready for accelerators: ``precision`` bf16/fp16 runs forward and backward under autocast
while weights and Adam state stay fp32 (fp16 adds a gradient scaler); AdamW is fused on
CUDA; losses stay on the device and are read once per call (no host synchronisation per
step); ``compile`` wraps the forward in ``torch.compile`` and falls back to eager with a
warning if compilation fails. fp32 on CPU with ``neighbour_batch=1`` is the paper's loop,
bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from index_server.encoder import CHARS_PER_TOKEN_BOUND

from .settings import PRECISIONS
from .trainer import TrainWork

MIN_CHUNK_TOKENS = 2


class LowPrecisionWeightsError(ValueError):
    """Full-parameter training refused on bf16/fp16 weights (no fp32 master copy)."""


@dataclass(frozen=True)
class TTTConfig:
    lr: float
    max_length: int  # tokens per training chunk (the scoring window too)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0
    reset_optimizer: bool = True
    precision: str = "fp32"
    compile: bool = False
    neighbour_batch: int = 1  # chunks per optimizer step


def chunk_tokens(token_ids: Sequence[int], max_length: int, cap: int | None = None) -> list[list[int]]:
    """Non-overlapping chunks of ``max_length``; chunks shorter than 2 tokens are dropped."""
    ids = list(token_ids[:cap] if cap is not None else token_ids)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [c for c in chunks if len(c) >= MIN_CHUNK_TOKENS]


def capped_tokens(tokenizer, texts: Sequence[str], cap: int | None) -> list[list[int]]:
    """Each text's tokens, its first ``cap`` when capped (the text is cut first where no
    tokenizer needs more characters for ``cap`` tokens, so a long text is not tokenised whole)."""
    texts = [t[: cap * CHARS_PER_TOKEN_BOUND] if cap else t for t in texts]
    return [tokenizer(t, add_special_tokens=False).input_ids[:cap] for t in texts]


def make_adamw(params: list[torch.nn.Parameter], config: TTTConfig) -> torch.optim.AdamW:
    """AdamW with the reference's settings; fused kernels on CUDA (CPU keeps torch's default
    implementation, so fp32 CPU numbers stay the reference's bit for bit)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
                             fused=True if fused else None)


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, attention mask, labels with -100 on the padding). Causal
    attention keeps every real token blind to the padding after it, so each row's logits
    are those of the row alone."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), device=device)
        mask[i, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token loss (nats) and its number of predicted tokens."""
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                 reduction="none")
    return token_loss.sum(1), (labels[:, 1:] != -100).sum(1)


class TestTimeTrainer:
    """Test-time training of one document's weights in place (see the module docstring)."""

    __test__ = False  # not a pytest class
    slots = 1

    def __init__(self, model: torch.nn.Module, config: TTTConfig, pad_id: int = 0):
        self.model = model
        self.config = config
        self.pad_id = pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        low = {str(p.dtype).removeprefix("torch.") for p in self.params if p.dtype != torch.float32}
        if low:  # AdamW steps of ~1e-5 are below the rounding step of most bf16/fp16 weights
            raise LowPrecisionWeightsError(
                f"the model's weights are {', '.join(sorted(low))}: updated in place, most test-time training steps "
                f"would round away. Load it with dtype=float32 (add precision=bf16 for bf16 arithmetic), or train "
                f"adapters (adapter=lora keeps them in float32)")
        with torch.no_grad():
            self._snapshot = [p.detach().clone() for p in self.params]
        self.optimizer = make_adamw(self.params, config)
        self.device = next(model.parameters()).device
        dtype = PRECISIONS[config.precision]
        self.autocast_dtype = getattr(torch, dtype) if dtype else None
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.forward = self._compiled_forward() if config.compile else model
        self._work = TrainWork()

    @property
    def lr(self) -> float:
        return self.config.lr

    def _compiled_forward(self):
        try:
            return torch.compile(self.model)
        except Exception as e:  # compile support differs by platform; eager always works
            warnings.warn(f"torch.compile failed ({e}); training in eager mode", stacklevel=2)
            return self.model

    def _run(self, **inputs):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            try:
                return self.forward(**inputs)
            except Exception as e:
                if self.forward is self.model:
                    raise
                warnings.warn(f"torch.compile failed at the first step ({type(e).__name__}: {e}); training in eager "
                              f"mode", stacklevel=2)
                self.forward = self.model
                return self.model(**inputs)

    def _losses(self, chunks: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's loss, each chunk's mean loss). One chunk: the model's own loss (labels =
        inputs), the paper's step; several: a padded batch whose loss is the mean over all its
        predicted tokens, as if its chunks were one sequence."""
        if len(chunks) == 1:
            inputs = torch.tensor([list(chunks[0])], device=self.device)
            loss = self._run(input_ids=inputs, labels=inputs).loss
            return loss, loss.detach()[None]
        ids, mask, labels = padded_batch(chunks, self.pad_id, self.device)
        sums, counts = row_losses(self._run(input_ids=ids, attention_mask=mask).logits, labels)
        return sums.sum() / counts.sum(), (sums / counts).detach()

    def step(self, chunks: Sequence[Sequence[int]], lr: float | None = None) -> torch.Tensor:
        """One optimizer step on a batch of chunks (labels = inputs); returns each chunk's
        loss, on the device. fp16: a step the gradient scaler skips (overflow) is counted as
        skipped (reading the scale is the one host synchronisation of that mode)."""
        skipped = 0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr if lr is None else lr
        with torch.enable_grad():
            loss, per_chunk = self._losses(chunks)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skipped = int(self.scaler.get_scale() < scale)
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._work.add(steps=1, skipped=skipped, tokens=sum(map(len, chunks)), seconds=0.0)
        return per_chunk

    def train(self, documents: Sequence[Sequence[Sequence[int]]], lr: float | None = None) -> list[list[list[float]]]:
        """One document's sequences (neighbours, or its own windows), in the given order."""
        (sequences,) = documents
        start = time.perf_counter()
        chunks = [(n, c) for n, tokens in enumerate(sequences)
                  for c in chunk_tokens(tokens, self.config.max_length)]
        size = self.config.neighbour_batch
        self.model.train()
        try:
            losses = [self.step([c for _, c in chunks[i : i + size]], lr) for i in range(0, len(chunks), size)]
        finally:
            self.model.eval()
        flat = torch.cat(losses).float().tolist() if losses else []
        if not all(math.isfinite(x) for x in flat):
            raise FloatingPointError(f"non-finite training loss in {flat}")
        per_sequence: list[list[float]] = [[] for _ in sequences]
        for (n, _), loss in zip(chunks, flat):
            per_sequence[n].append(loss)
        self._work.seconds += time.perf_counter() - start
        return [per_sequence]

    def weights(self, slots: int | Sequence[int]) -> contextlib.AbstractContextManager:
        """One slot, whose weights are the model's own."""
        return contextlib.nullcontext()

    def work(self) -> list[TrainWork]:
        return [self._work]

    def reset(self) -> None:
        """Restore the original weights bit for bit and (by default) forget Adam's state."""
        with torch.no_grad():
            for p, saved in zip(self.params, self._snapshot):
                p.copy_(saved)
                p.grad = None
        if self.config.reset_optimizer:
            self.optimizer.state.clear()
        if self.scaler is not None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self._work = TrainWork()
