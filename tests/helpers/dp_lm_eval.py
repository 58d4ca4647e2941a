"""The stock lm_eval CLI with HFLM's data-parallel rank assignment applied on CPU.

HFLM takes its rank and world size from accelerate only when it sees more than one CUDA
device; under ``torchrun`` on a CPU machine it would run every rank as rank 0 of 1. This
shim does what HFLM does on GPUs (rank, world size, the accelerator the evaluator gathers
through) so the harness's real data-parallel path runs with gloo on CPU processes.
"""

import functools
import os

os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate's multi-CPU (gloo) mode under torchrun

from accelerate import Accelerator  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

_init = HFLM.__init__


@functools.wraps(_init)  # keeps HFLM's signature, which ttt-nn validates its arguments against
def _data_parallel_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.accelerator = Accelerator()
    self._rank = self.accelerator.process_index
    self._world_size = self.accelerator.num_processes


HFLM.__init__ = _data_parallel_init

if __name__ == "__main__":
    from lm_eval_ttt._registration import lm_eval_main

    lm_eval_main()
