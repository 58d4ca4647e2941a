"""Registers ``--model ttt-nn`` (and its baselines) with the stock ``lm_eval`` command.

The model names live in one place: the ``lm_eval.models`` entry points of ``pyproject.toml``
(read from the installed distribution's metadata, or from ``pyproject.toml`` in a source
checkout). Harness releases that discover models through that entry-point group use them
directly. lm-eval 0.4.13 reads no entry points, and ``get_model`` imports ``lm_eval.models``
(which registers every built-in model) only while the registry is empty: registering ours
earlier would hide ``hf`` and the rest. So at interpreter start this module only installs a
meta-path hook; when ``lm_eval.models`` has finished importing, the hook registers our
names as lazy ``"module:Class"`` targets. Nothing heavy is imported at start (~1 ms).

Start-up files: ``lm_eval_ttt.pth`` (an import line; deprecated by PEP 829 and ignored from
Python 3.18) and ``lm_eval_ttt.start`` (PEP 829's replacement, read from Python 3.15; it
names ``install``). Where neither runs (``python -S``, PYTHONPATH or ``--target`` installs),
``lm-eval-ttt`` / ``python -m lm_eval_ttt`` is the stock CLI with our models registered.
"""

from __future__ import annotations

import sys

ENTRY_POINT_GROUP = "lm_eval.models"
DISTRIBUTION = "ttt-nn"
_TARGET = "lm_eval.models"


def models() -> dict[str, str]:
    """{model name: "module:Class"} from our ``lm_eval.models`` entry points."""
    from importlib import metadata

    try:
        entry_points = metadata.distribution(DISTRIBUTION).entry_points
        return {ep.name: ep.value for ep in entry_points if ep.group == ENTRY_POINT_GROUP}
    except metadata.PackageNotFoundError:  # a source checkout on sys.path, not installed
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        with open(pyproject, "rb") as f:
            return dict(tomllib.load(f)["project"]["entry-points"][ENTRY_POINT_GROUP])


def register() -> None:
    from lm_eval.api.registry import model_registry

    for name, target in models().items():
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
    """``lm-eval-ttt`` / ``python -m lm_eval_ttt``: the stock harness CLI with ttt-nn
    registered explicitly, for environments where no start-up file runs."""
    import lm_eval.models  # noqa: F401  (built-in models first, then ours)
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


def install() -> None:
    """Idempotent: the .pth import line and the .start entry may both run."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
