"""ttt-nn: test-time training on nearest neighbours as an lm-evaluation-harness model.

Kept import-free: ``lm_eval_ttt.pth`` imports ``lm_eval_ttt._registration`` at every
interpreter start, so this package must cost nothing to import.
"""

__version__ = "0.1.0"
