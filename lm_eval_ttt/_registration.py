"""Registers ``--model ttt-nn`` (and its baselines) with lm-eval 0.4.13, imported at start-up by ``lm_eval_ttt.pth``.

lm-eval 0.4.13 reads no entry points for models, and ``get_model`` imports
``lm_eval.models`` (which registers every built-in model) only while the registry is empty:
registering ours earlier would hide ``hf`` and the rest. So this module only installs a
meta-path hook; when ``lm_eval.models`` has finished importing, the hook adds ``ttt-nn`` as a
lazy ``"module:Class"`` target. Nothing heavy is imported at interpreter start (~1 ms).
"""

from __future__ import annotations

import sys

MODELS = {
    "ttt-nn": "lm_eval_ttt.model:TTTNNLM",
    "ttt-nn-context": "lm_eval_ttt.baselines:InContextLM",
    "ttt-nn-interp": "lm_eval_ttt.baselines:InterpolationLM",
    "ttt-nn-dyneval": "lm_eval_ttt.baselines:DynamicEvalLM",
}
_TARGET = "lm_eval.models"


def register() -> None:
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


class _RegisterAfterImport:
    """Finds ``lm_eval.models`` through the other finders and registers after it executes.

    A meta-path finder and loader by protocol (``find_spec``, ``create_module``,
    ``exec_module``); subclassing ``importlib.abc`` would import ``importlib.resources``,
    ``pathlib`` and ``tempfile`` at every interpreter start (~35 ms).
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        register()


def lm_eval_main() -> None:
    """``lm-eval-ttt``: the stock harness CLI with ttt-nn registered explicitly.

    A fallback for environments where ``.pth`` files are not processed (``python -S``,
    some embedded interpreters); the arguments are exactly ``lm_eval``'s.
    """
    import lm_eval.models  # noqa: F401  (built-in models first, then ours)
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


def install() -> None:
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
