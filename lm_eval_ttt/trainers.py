"""Which weights test-time training updates, and ``build_trainer``, the factory above the
``trainer.Trainer`` implementations:

* ``adapter=none`` (default): every weight, or with ``train_layers=N`` the top N blocks and
  what sits above them, reset from a snapshot (``ttt.TestTimeTrainer``, one document at a time);
* ``adapter=lora``: fresh low-rank adapters through peft, base frozen (``lora.py``); with
  ``doc_batch`` > 1, per-document adapters trained in one batch (``lora.BatchedLoRATrainer``);
* ``peft=ADAPTER`` (HFLM's own argument: a trained adapter loaded over the base model): the
  adapter's weights are trained and reset; the base stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocator import keep_freed_memory
from .lora import BatchedLoRA, BatchedLoRATrainer, add_lora
from .settings import (
    DEFAULT_LORA_LR,
    LARGE_MODEL_PARAMS,
    PAPER_LR_LARGE,
    PAPER_LR_SMALL,
    PRECISIONS,
    ModelArgumentError,
    TrainSettings,
)
from .trainer import Trainer
from .ttt import TestTimeTrainer, TTTConfig


def default_lr(n_params: int) -> float:
    """The paper's constant learning rates of full test-time training."""
    return PAPER_LR_SMALL if n_params < LARGE_MODEL_PARAMS else PAPER_LR_LARGE


def check_train_settings(t: TrainSettings, hf_kwargs: dict) -> None:
    """Combinations refused before the model loads."""
    implied = implied_hf_kwargs(t)
    given = hf_kwargs.get("mixed_precision_dtype")
    if implied and given is not None and str(given) != implied["mixed_precision_dtype"]:
        raise ModelArgumentError(f"precision={t.precision} conflicts with mixed_precision_dtype={given}")
    if t.adapter == "lora" and hf_kwargs.get("peft"):
        raise ModelArgumentError("adapter=lora trains fresh adapters; it cannot be combined with peft=")
    if t.doc_batch > 1 and t.adapter != "lora":
        raise ModelArgumentError("doc_batch > 1 needs adapter=lora (each document trains its own adapter)")
    if t.doc_batch > 1 and (t.precision != "fp32" or t.compile):
        raise ModelArgumentError("doc_batch > 1 trains in fp32 without torch.compile: drop precision= / compile=")
    if t.doc_batch > 1 and t.lora_dropout > 0:
        raise ModelArgumentError(_BATCH_DROPOUT.format(what=f"lora_dropout={t.lora_dropout}"))


def implied_hf_kwargs(t: TrainSettings) -> dict[str, str]:
    """HFLM arguments the training settings imply: scoring autocasts as training does."""
    return {"mixed_precision_dtype": PRECISIONS[t.precision]} if PRECISIONS[t.precision] else {}


# A batch draws its dropout masks per batch: a document's score would depend on which
# documents shared its batch (and so on resumes and rank counts). doc_batch=1 has no such issue.
_BATCH_DROPOUT = ("doc_batch > 1 needs dropout off ({what}): a batch draws dropout masks for all its documents "
                  "at once, so each score would depend on which documents share the batch; use doc_batch=1")


def model_dropout(model: torch.nn.Module) -> float:
    """The largest dropout rate the model applies in training (modules and config rates)."""
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    config = getattr(model, "config", None)
    if config is not None:  # rates applied functionally (e.g. attention_dropout in sdpa), not as modules
        rates += [v for k, v in vars(config).items() if isinstance(v, float)
                  and (k.endswith("dropout") or k.endswith("pdrop"))
                  and not k.startswith(_HEAD_ONLY_DROPOUT)]
    return max(rates, default=0.0)


# Config rates used only by classification or summary heads, never by a causal LM's forward.
_HEAD_ONLY_DROPOUT = ("classifier_", "summary_")


def _train_loaded_adapter(model: torch.nn.Module) -> None:
    """HFLM loads ``peft=`` adapters frozen; TTT trains the adapter and keeps the base frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_requires_grad(model.active_adapters, True)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer, non-reentrant (frozen inputs need no grad);
    transformers 5 renamed the method, 4.x has only the old name."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:  # transformers: "... does not support gradient checkpointing"
        raise ModelArgumentError(f"gradient_checkpointing=true: {e}") from e


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Blocks:
    """A causal LM's stack of transformer blocks, as transformers lays it out."""

    owner: torch.nn.Module  # the module holding the stack (e.g. LlamaModel, GPT2Model)
    name: str  # its attribute there (layers, h, ...)
    stack: torch.nn.ModuleList


def transformer_blocks(model: torch.nn.Module) -> Blocks:
    """The block stack: the longest ModuleList whose modules are all of a class the model's
    ``_no_split_modules`` names (transformers' own list of its block classes)."""
    block_classes = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    found = []
    for owner in model.modules():
        for name, child in owner.named_children():
            if (isinstance(child, torch.nn.ModuleList) and len(child)
                    and all(type(block).__name__ in block_classes for block in child)):
                found.append(Blocks(owner, name, child))
    if not found:
        raise ModelArgumentError(f"train_layers: cannot find the transformer blocks of {type(model).__name__} (no "
                                 f"module list of the classes transformers names in _no_split_modules)")
    return max(found, key=lambda b: len(b.stack))


def top_layers(model: torch.nn.Module, n: int) -> tuple[Blocks, list[int]]:
    blocks = transformer_blocks(model)
    if n > len(blocks.stack):
        raise ModelArgumentError(f"train_layers={n}: the model has {len(blocks.stack)} transformer blocks")
    return blocks, list(range(len(blocks.stack) - n, len(blocks.stack)))


def train_top_layers(model: torch.nn.Module, n: int) -> None:
    """Freeze every weight but the top n blocks and what runs after them: the modules
    registered after the stack beside it (the final norm), and the output head unless it is
    tied to the input embeddings (training it would train them, and their gradient needs the
    backward pass through every block)."""
    blocks, top = top_layers(model, n)
    keep = [blocks.stack[i] for i in top]
    after = False
    for name, child in blocks.owner.named_children():
        after = after or name == blocks.name
        if after and name != blocks.name:
            keep.append(child)
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and not (inputs is not None and head.weight is inputs.weight):
        keep.append(head)
    trainable = {id(p) for module in keep for p in module.parameters()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)


def build_trainer(model: torch.nn.Module, t: TrainSettings, *, max_length: int, seed: int, pad_id: int,
                  peft_loaded: bool, reset_optimizer: bool = True, neighbour_batch: int = 1,
                  method_lr: float | None = None) -> tuple[torch.nn.Module, Trainer]:
    """The trainer for the settings, and the model to score with: ``model`` itself, or the
    adapted one when ``adapter=lora`` wraps it. ``peft_loaded``: ``model`` carries a
    ``peft=`` adapter, which is what trains. ``method_lr``: the method's rate when ``lr`` is
    not given (None: the paper's rule for the model's size, or LoRA's default)."""
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # each step reuses the memory the step before freed (allocator.py)
    if peft_loaded:
        _train_loaded_adapter(model)
    if t.lr is not None:
        lr = t.lr
    elif method_lr is not None:
        lr = method_lr
    else:
        lr = DEFAULT_LORA_LR if t.adapter == "lora" else default_lr(n_parameters(model))
    config = TTTConfig(lr=lr, max_length=max_length, reset_optimizer=reset_optimizer, precision=t.precision,
                       compile=t.compile, neighbour_batch=neighbour_batch)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    if t.adapter != "lora":
        if t.train_layers is not None:
            train_top_layers(model, t.train_layers)
        return model, TestTimeTrainer(model, config, pad_id)
    blocks = top_layers(model, t.train_layers) if t.train_layers is not None else None
    adapted = add_lora(model, t, seed, blocks=blocks)
    if t.doc_batch == 1:
        return adapted, TestTimeTrainer(adapted, config, pad_id)
    dropout = model_dropout(model)
    if dropout > 0:
        raise ModelArgumentError(_BATCH_DROPOUT.format(what=f"the model's dropout is {dropout}"))
    adapters = BatchedLoRA(adapted, t.doc_batch)
    return adapters.model, BatchedLoRATrainer(adapters, config, pad_id=pad_id)
