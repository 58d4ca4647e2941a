"""Loader named by the Pile task YAMLs here (``custom_dataset: !function pile_loader.load_pile``);
the code lives in ``lm_eval_ttt.task_data``."""

from lm_eval_ttt.task_data import load_pile  # noqa: F401
