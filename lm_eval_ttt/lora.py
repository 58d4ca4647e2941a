"""Parameter-efficient test-time training: low-rank adapters instead of every weight.

``adapter=lora`` wraps the model with peft (``LoraConfig``; by default every linear layer
peft finds in the architecture, ``"all-linear"``: the attention and MLP projections). Only
the adapters train; the base weights are frozen and never written, so no snapshot of them is
taken: a reset copies the adapters' initial values back (a few MB) and clears Adam's state.

``doc_batch=B`` trains B documents at once, each with its own adapter, in one forward and
backward pass. peft cannot give each row of a batch its own adapter while training, so this
part is written here (as the openai/parameter-golf LoRA-TTT record does): the adapters peft
initialised are copied into B slots of per-document low-rank matrices, applied by forward
hooks on the same linear layers (row i of a batch uses slot ``slots[i]``); ``BatchedAdamW``
is torch's AdamW with per-slot step counts, per-slot gradient clipping, and updates only for
the slots that trained in a step. Documents are scored with their own slot. Results equal
``doc_batch=1`` to float rounding (different matmul shapes and reduction orders), provided
dropout is off (the default lora_dropout=0 and a dropout-free base model): a batch draws
its dropout masks in another order than one document at a time. ``doc_batch`` > 1 trains in
fp32 without ``torch.compile`` and always resets Adam between documents (refused otherwise).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import torch

from .settings import ModelArgumentError, TrainSettings
from .trainer import TrainWork
from .ttt import TTTConfig, chunk_tokens, padded_batch, row_losses

ADAPTER = "default"


def lora_config(t: TrainSettings, model: torch.nn.Module | None = None, blocks=None):
    """peft's LoraConfig for the settings. ``blocks`` (a ``trainers.Blocks`` stack and the
    indices of its top blocks, ``trainers.top_layers``) limits the adapters to the linear
    layers inside those blocks of ``model``, named by their full paths."""
    from peft import LoraConfig

    targets = list(t.lora_targets) if t.lora_targets else "all-linear"
    if blocks is not None:
        stack, top = blocks
        inside = {id(m) for i in top for m in stack.stack[i].modules()}
        targets = [name for name, m in model.named_modules() if id(m) in inside and isinstance(m, torch.nn.Linear)
                   and (not t.lora_targets or name.rsplit(".", 1)[-1] in t.lora_targets)]
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      target_modules=targets)


def add_lora(model: torch.nn.Module, t: TrainSettings, seed: int, blocks=None):
    """The model wrapped with fresh adapters (initialised from ``seed``), base frozen."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, lora_config(t, model, blocks))
        except (ValueError, TypeError, KeyError, NotImplementedError) as e:
            raise ModelArgumentError(f"adapter=lora: peft cannot adapt {type(model).__name__} ({e}); name the layers "
                                     f"to adapt with lora_targets=, e.g. lora_targets=q_proj:v_proj") from e


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


class BatchedLoRA:
    """Per-document adapters on the layers peft chose, as forward hooks on the base layers."""

    def __init__(self, peft_model, slots: int):
        self.slots = slots
        self.A, self.B, self.scale, self.dropout, self.hooks = {}, {}, {}, {}, []
        self._rows: torch.Tensor | None = None
        layers = lora_layers(peft_model)
        init = {name: (m.lora_A[ADAPTER].weight.detach().clone(), m.lora_B[ADAPTER].weight.detach().clone(),
                       m.scaling[ADAPTER], m.lora_dropout[ADAPTER]) for name, m in layers.items()}
        self.model = peft_model.unload()  # the plain base model again; the hooks carry the adapters
        modules = dict(self.model.named_modules())
        for peft_name, (a, b, scale, dropout) in init.items():
            name = peft_name.removeprefix("base_model.model.")
            self.A[name] = torch.nn.Parameter(a.unsqueeze(0).repeat(slots, 1, 1))
            self.B[name] = torch.nn.Parameter(b.unsqueeze(0).repeat(slots, 1, 1))
            self.scale[name], self.dropout[name] = scale, dropout
            self.hooks.append(modules[name].register_forward_hook(self._hook(name)))
        self.initial = [(p.detach().clone()) for p in self.parameters()]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.A for p in (self.A[name], self.B[name])]

    def _hook(self, name: str):
        def add_adapter(module, args, output):
            if self._rows is None:
                return output
            rows = self._rows.expand(output.shape[0]) if self._rows.numel() == 1 else self._rows
            x = self.dropout[name](args[0])
            low = torch.bmm(x, self.A[name][rows].transpose(1, 2))
            return output + torch.bmm(low, self.B[name][rows].transpose(1, 2)) * self.scale[name]

        return add_adapter

    @contextlib.contextmanager
    def use(self, slots: Sequence[int] | int):
        """Row i of the next forward passes uses adapter ``slots[i]`` (an int: every row)."""
        device = next(iter(self.A.values())).device
        self._rows = torch.as_tensor([slots] if isinstance(slots, int) else list(slots), device=device)
        try:
            yield
        finally:
            self._rows = None

    def reset(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.parameters(), self.initial):
                p.copy_(saved)
                p.grad = None


class BatchedAdamW:
    """torch's AdamW (decoupled weight decay, bias-corrected moments) over parameters whose
    first dimension is the document slot, with a step count per slot; ``step(active)``
    updates only the slots that trained."""

    def __init__(self, params: list[torch.nn.Parameter], config: TTTConfig, slots: int, betas=(0.9, 0.999)):
        self.params, self.config, self.betas = params, config, betas
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = torch.zeros(slots, dtype=torch.float64)

    def clip(self) -> None:
        """Gradient norm clipping per slot, as clip_grad_norm_ does for one document."""
        norms = torch.zeros(len(self.steps), dtype=torch.float32, device=self.params[0].device)
        for p in self.params:
            norms += p.grad.flatten(1).pow(2).sum(1)
        coef = (self.config.grad_clip / (norms.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor, lr: float | None = None) -> None:
        beta1, beta2 = self.betas
        lr = self.config.lr if lr is None else lr
        eps, wd = self.config.eps, self.config.weight_decay
        self.steps[active.cpu()] += 1
        steps = self.steps.clamp(min=1)
        step_size = (lr / (1 - beta1 ** steps)).to(torch.float32)
        bias2_sqrt = ((1 - beta2 ** steps) ** 0.5).to(torch.float32)
        mask = active.to(self.params[0].device)
        for p, (exp_avg, exp_avg_sq) in zip(self.params, self.state):
            shape = (-1, *[1] * (p.dim() - 1))
            m = mask.view(shape)
            g = p.grad
            new_p = p * (1 - lr * wd)
            new_avg = exp_avg.lerp(g, 1 - beta1)
            new_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
            denom = new_sq.sqrt() / bias2_sqrt.to(p.device).view(shape) + eps
            new_p = new_p - step_size.to(p.device).view(shape) * new_avg / denom
            p.copy_(torch.where(m, new_p, p))
            exp_avg.copy_(torch.where(m, new_avg, exp_avg))
            exp_avg_sq.copy_(torch.where(m, new_sq, exp_avg_sq))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self) -> None:
        for exp_avg, exp_avg_sq in self.state:
            exp_avg.zero_()
            exp_avg_sq.zero_()
        self.steps.zero_()


class BatchedLoRATrainer:
    """Up to ``slots`` documents trained at once, each on its own sequences and adapter (a
    ``trainer.Trainer``)."""

    __test__ = False

    def __init__(self, adapters: BatchedLoRA, config: TTTConfig, pad_id: int):
        self.adapters, self.config, self.pad_id = adapters, config, pad_id
        self.slots = adapters.slots
        self.model = adapters.model
        self.device = next(self.model.parameters()).device
        self.optimizer = BatchedAdamW(adapters.parameters(), config, adapters.slots)
        self._work = [TrainWork() for _ in range(self.slots)]

    @property
    def lr(self) -> float:
        return self.config.lr

    def _losses(self, rows: list[list[int]]) -> torch.Tensor:
        """Mean next-token loss of each row of a right-padded batch."""
        ids, _, labels = padded_batch(rows, self.pad_id, self.device)
        sums, counts = row_losses(self.model(input_ids=ids).logits, labels)
        return sums / counts

    def train(self, documents: Sequence[Sequence[Sequence[int]]], lr: float | None = None) -> list[list[list[float]]]:
        """Step t trains chunk t of every document that has one; a step's time is shared
        evenly by the documents in it."""
        per_doc = []
        for sequences in documents:
            chunks = []
            for n, tokens in enumerate(sequences):
                chunks += [(n, c) for c in chunk_tokens(tokens, self.config.max_length)]
            per_doc.append(chunks)
        losses: list[list[list[torch.Tensor]]] = [[[] for _ in n] for n in documents]
        self.model.train()
        try:
            for t in range(max(map(len, per_doc), default=0)):
                start = time.perf_counter()
                active = [d for d, chunks in enumerate(per_doc) if t < len(chunks)]
                with torch.enable_grad(), self.adapters.use(active):
                    row_loss = self._losses([per_doc[d][t][1] for d in active])
                    row_loss.sum().backward()
                mask = torch.zeros(self.adapters.slots, dtype=torch.bool)
                mask[active] = True
                self.optimizer.clip()
                self.optimizer.step(mask, lr)
                self.optimizer.zero_grad()
                seconds = (time.perf_counter() - start) / len(active)
                for d, loss in zip(active, row_loss.detach()):
                    losses[d][per_doc[d][t][0]].append(loss)
                    self._work[d].add(steps=1, skipped=0, tokens=len(per_doc[d][t][1]), seconds=seconds)
        finally:
            self.model.eval()
        flat = [x for doc in losses for n in doc for x in n]
        values = torch.stack(flat).tolist() if flat else []
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"non-finite training loss in {values}")
        it = iter(values)
        return [[[next(it) for _ in n] for n in doc] for doc in losses]

    def weights(self, slots: int | Sequence[int]) -> contextlib.AbstractContextManager:
        return self.adapters.use(slots)

    def work(self) -> list[TrainWork]:
        return self._work

    def reset(self) -> None:
        self.adapters.reset()
        self.optimizer.reset()
        self._work = [TrainWork() for _ in range(self.slots)]
