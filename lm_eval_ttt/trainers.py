"""Which weights test-time training updates, and the trainer that updates them.

* ``adapter=none`` (default): every weight, reset from a snapshot (``ttt.TestTimeTrainer``).
* ``adapter=lora``: fresh low-rank adapters through peft, base frozen (``lora.py``); with
  ``doc_batch`` > 1, per-document adapters trained in one batch (``BatchedLoRATrainer``).
* ``peft=ADAPTER`` (HFLM's own argument: a trained adapter loaded over the base model):
  the adapter's weights are trained and reset; the base stays frozen.
"""

from __future__ import annotations

import torch

from .settings import ModelArgumentError, TrainSettings
from .ttt import TestTimeTrainer, TTTConfig, default_lr

_AUTOCAST_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def check_train_settings(t: TrainSettings, hf_kwargs: dict) -> None:
    """Combinations refused before the model loads; ``precision`` also sets HFLM's scoring
    autocast (``mixed_precision_dtype``) so training and scoring use the same arithmetic."""
    if t.precision != "fp32":
        given = hf_kwargs.get("mixed_precision_dtype")
        if given is not None and str(given) != _AUTOCAST_NAMES[t.precision]:
            raise ModelArgumentError(f"precision={t.precision} conflicts with mixed_precision_dtype={given}")
        hf_kwargs["mixed_precision_dtype"] = _AUTOCAST_NAMES[t.precision]
    if t.adapter == "lora" and hf_kwargs.get("peft"):
        raise ModelArgumentError("adapter=lora trains fresh adapters; it cannot be combined with peft=")
    if t.doc_batch > 1 and t.adapter != "lora":
        raise ModelArgumentError("doc_batch > 1 needs adapter=lora (each document trains its own adapter)")
    if t.doc_batch > 1 and (t.precision != "fp32" or t.compile):
        raise ModelArgumentError("doc_batch > 1 trains in fp32 without torch.compile: drop precision= / compile=")
    if t.doc_batch > 1 and t.lora_dropout > 0:
        raise ModelArgumentError(_BATCH_DROPOUT.format(what=f"lora_dropout={t.lora_dropout}"))


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


def step_counts(attempted: int, skipped: int) -> dict:
    """A document's log fields for its gradient steps: fp16 steps the gradient scaler skipped
    on overflow took no step, so they are counted apart."""
    return {"train_steps": attempted - skipped, **({"skipped_steps": skipped} if skipped else {})}


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_trainer(lm, t: TrainSettings, max_neighbor_tokens: int | None, reset_optimizer: bool):
    """The trainer of a harness model ``lm`` (an HFLM) for the given settings; with adapters,
    ``lm``'s model is replaced by the adapted one."""
    from .lora import DEFAULT_LORA_LR, BatchedLoRA, BatchedLoRATrainer, add_lora

    if lm.peft:
        _train_loaded_adapter(lm.model)
    if t.lr is not None:
        lr = t.lr
    else:
        lr = DEFAULT_LORA_LR if t.adapter == "lora" else default_lr(n_parameters(lm.model))
    config = TTTConfig(lr=lr, max_length=lm.max_length, max_neighbor_tokens=max_neighbor_tokens,
                       reset_optimizer=reset_optimizer, precision=t.precision, compile=t.compile)
    if t.gradient_checkpointing:
        enable_checkpointing(lm.model)
    if t.adapter == "lora":
        adapted = add_lora(lm.model, t, lm.seed)
        if t.doc_batch > 1:
            dropout = model_dropout(lm.model)
            if dropout > 0:
                raise ModelArgumentError(_BATCH_DROPOUT.format(what=f"the model's dropout is {dropout}"))
            adapters = BatchedLoRA(adapted, t.doc_batch)
            lm._model = adapters.model
            return BatchedLoRATrainer(adapters, config, pad_id=lm.tokenizer.pad_token_id or 0)
        lm._model = adapted
    return TestTimeTrainer(lm.model, config)
