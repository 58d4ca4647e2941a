"""Directories that appear whole or not at all."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch sibling directory that replaces ``output`` only if the block succeeds.

    On any exception the scratch directory is removed and ``output`` is left untouched.
    """
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield scratch
        scratch.chmod(0o755)  # mkdtemp creates it private
        if output.exists():
            shutil.rmtree(output)
        scratch.rename(output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
