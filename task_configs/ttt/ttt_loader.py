"""Loaders named by the task YAMLs here (``custom_dataset: !function ttt_loader.load_bundled``);
the code lives in ``lm_eval_ttt.task_data``."""

from lm_eval_ttt.task_data import load_bundled, load_corpus  # noqa: F401
