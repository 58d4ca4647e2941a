"""Dynamic evaluation (Krause et al., 2018): score a window of the document, then learn from it.

The rule that keeps it honest: no token is trained on before it is scored. A rolling
document's disjoint windows are scored one at a time; after window i is scored, the trainer
takes ``iterations`` steps on it, and only then is window i+1 scored. Nothing is trained
after the last window (it could change no score). ``ttt-nn-dyneval`` runs this from the base
weights; ``ttt-nn`` with ``dyneval_iterations`` runs it after training on the neighbours.
"""

from __future__ import annotations

import time

from .documents import Document
from .trainer import Trainer


def score_dynamically(lm, trainer: Trainer, document: Document, iterations: int, lr: float | None = None
                      ) -> tuple[list[float], list[float], float]:
    """(the document's answers, each window's log-likelihood, seconds spent scoring). The
    trainer's work counts the steps on the document."""
    windows = document.kind.pairs(lm, document, None)
    window_lls, score_s = [], 0.0
    for i, (context, continuation) in enumerate(windows):
        start = time.perf_counter()
        window_lls.append(lm.score_windows([(context, continuation)])[0][0])
        score_s += time.perf_counter() - start
        if i < len(windows) - 1:
            for _ in range(iterations):  # one step each, whatever the trainer's neighbour_batch
                trainer.train([[context + continuation]], lr=lr)
    return document.kind.fold([(ll, False) for ll in window_lls]), window_lls, score_s
