"""The test-time training loop: one AdamW step per neighbour chunk, then an exact reset.

Per document: ``train(neighbour_tokens)`` takes the neighbours in the given order, cuts each
into non-overlapping chunks of ``max_length`` tokens (capped at ``max_neighbor_tokens``),
and takes one step per chunk; ``reset()`` copies the original weights back in place and
empties the optimizer state. The snapshot is one copy of the trainable parameters taken
once; no module deepcopy and no reload from disk, so a reset costs one memcpy.

Fixes of the reference loop: the optimizer no longer leaks Adam moments from one document
into the next (``reset_optimizer=False`` brings the leak back for comparison), neighbours
can be capped, and a trailing chunk of fewer than 2 tokens (no next-token label, NaN loss)
is skipped instead of stepping on NaN.

Ready for accelerators: ``precision`` bf16/fp16 runs forward and backward under autocast
while weights and Adam state stay fp32 (fp16 adds a gradient scaler); AdamW is fused on
CUDA; losses stay on the device and are read once per document (no host synchronisation
per step); ``compile`` wraps the forward in ``torch.compile`` and falls back to eager with a
warning if compilation fails. fp32 on CPU is the reference loop, bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_CHUNK_TOKENS = 2


class LowPrecisionWeightsError(ValueError):
    """Full-parameter training refused on bf16/fp16 weights (no fp32 master copy)."""
LARGE_MODEL_PARAMS = 1_000_000_000
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    precision: str = "fp32"
    compile: bool = False


def chunk_tokens(token_ids: Sequence[int], max_length: int, cap: int | None = None) -> list[list[int]]:
    """Non-overlapping chunks of ``max_length``; chunks shorter than 2 tokens are dropped."""
    ids = list(token_ids[:cap] if cap is not None else token_ids)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [c for c in chunks if len(c) >= MIN_CHUNK_TOKENS]


def make_adamw(params: list[torch.nn.Parameter], config: TTTConfig) -> torch.optim.AdamW:
    """AdamW with the reference's settings; fused kernels on CUDA (CPU keeps torch's default
    implementation, so fp32 CPU numbers stay the reference's bit for bit)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
                             fused=True if fused else None)


class TestTimeTrainer:
    __test__ = False  # not a pytest class

    def __init__(self, model: torch.nn.Module, config: TTTConfig):
        self.model = model
        self.config = config
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
        self.autocast_dtype = PRECISIONS[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.forward = self._compiled_forward() if config.compile else model
        self.skipped_steps = 0  # fp16 steps skipped on overflow since the last reset

    def _compiled_forward(self):
        try:
            return torch.compile(self.model)
        except Exception as e:  # compile support differs by platform; eager always works
            warnings.warn(f"torch.compile failed ({e}); training in eager mode", stacklevel=2)
            return self.model

    def _loss(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            try:
                return self.forward(input_ids=inputs, labels=inputs).loss
            except Exception as e:
                if self.forward is self.model:
                    raise
                warnings.warn(f"torch.compile failed at the first step ({type(e).__name__}: {e}); training in eager "
                              f"mode", stacklevel=2)
                self.forward = self.model
                return self.model(input_ids=inputs, labels=inputs).loss

    def step(self, chunk: Sequence[int]) -> torch.Tensor:
        """One optimizer step on one chunk (labels = inputs); the loss stays on the device.
        fp16: a step the gradient scaler skips (overflow) is counted in ``skipped_steps``
        (reading the scale is the one host synchronisation of that mode)."""
        inputs = torch.tensor([list(chunk)], device=self.device)
        with torch.enable_grad():
            loss = self._loss(inputs)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.skipped_steps += self.scaler.get_scale() < scale
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train(self, neighbour_tokens: Sequence[Sequence[int]]) -> list[list[float]]:
        """Train on neighbours in the given order; returns per-neighbour chunk losses
        (nats per token), read from the device once. (The caller seeds the randomness per
        document: the base loop does.)"""
        self.model.train()
        try:
            losses = [[self.step(c) for c in chunk_tokens(tokens, self.config.max_length,
                                                          self.config.max_neighbor_tokens)]
                      for tokens in neighbour_tokens]
        finally:
            self.model.eval()
        flat = torch.stack([loss for per in losses for loss in per]).float().tolist() if any(losses) else []
        if not all(math.isfinite(x) for x in flat):
            raise FloatingPointError(f"non-finite training loss in {flat}")
        it = iter(flat)
        return [[next(it) for _ in per] for per in losses]

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
        self.skipped_steps = 0
