"""Files and directories that appear whole or not at all, and never replace what they should not.

``atomic_write`` writes one file through a temporary sibling named with its owner (host
and pid), fsyncs it, renames it into place and fsyncs the directory; ``exclusive`` links it
instead, so the first of concurrent writers wins. ``remove_stale_temporaries`` removes the
temporaries of writers on this host that died.

``atomic_output`` yields a scratch sibling directory that replaces the target only when the
block succeeds, after everything in it is fsynced. The scratch directory carries its owner
(host and pid): SIGTERM removes it on the way out, and after a SIGKILL or power loss the next
``atomic_output`` on the same target, on the same host, finds and removes it (a scratch
directory of another host is left alone: its pid means nothing here). If the process died
between the two renames of the swap, the previous output is renamed back.
``--overwrite`` only ever replaces a directory that ``is_ours`` recognises (an index this
tool built: its manifest loads) and never one that holds an input of the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .digest import HashingWriter

_SCRATCH_TAG = ".tmp-"
_OWNER_FILE = ".owner"
_OLD = "old-"


def owner_tag() -> str:
    """``host-pid`` of this process: names the owner of scratch and temporary files."""
    return f"{socket.gethostname()}-{os.getpid()}"


def tag_is_stale(tag: str) -> bool:
    """True when the owner named by ``tag`` (``host-pid`` or a bare pid) ran on this host and
    no longer runs. Another host's owner is never judged stale: its pid means nothing here."""
    host, _, pid = tag.strip().rpartition("-")
    if not pid.isdigit() or (host and host != socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it replaces anything)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def atomic_write(path: Path, content: bytes | str | Callable[[BinaryIO], object], exclusive: bool = False) -> str:
    """Write ``path`` whole or not at all; returns the sha256 of what was written.

    ``content`` is the bytes (a str is UTF-8 encoded) or a function that writes them to a
    binary file. The temporary is removed on any error. ``exclusive``: never replace an
    existing ``path`` (``FileExistsError``; the first writer wins)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_SCRATCH_TAG}{owner_tag()}")
    try:
        with open(tmp, "wb") as f:
            hashing = HashingWriter(f)
            if callable(content):
                content(hashing)
            else:
                hashing.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return hashing.sha.hexdigest()


def remove_stale_temporaries(directory: Path) -> None:
    """``atomic_write`` temporaries in ``directory`` of writers on this host that no longer
    run; writers on other hosts sharing the directory keep theirs."""
    for tmp in Path(directory).glob(f".*{_SCRATCH_TAG}*"):
        if tmp.is_file() and tag_is_stale(tmp.name.rsplit(_SCRATCH_TAG, 1)[1]):
            tmp.unlink(missing_ok=True)


def names_output(name: str, output: Path) -> bool:
    """Whether a directory entry called ``name`` beside ``output`` is ``output`` itself or one
    of the scratch siblings ``atomic_output`` writes it through."""
    return name == output.name or name.startswith(f".{output.name}{_SCRATCH_TAG}")


def remove_stale_scratch(output: Path) -> list[Path]:
    """Remove scratch siblings of ``output`` left by processes of this host that no longer
    run; a previous output renamed away by a swap that died halfway is renamed back."""
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in sorted(output.parent.glob(f".{output.name}{_SCRATCH_TAG}*")):
        owner = candidate / _OWNER_FILE
        try:
            tag = owner.read_text()
        except OSError:
            continue  # not ours, or its owner is still writing its tag
        if not tag_is_stale(tag):
            continue
        if candidate.name.startswith(f".{output.name}{_SCRATCH_TAG}{_OLD}") and not output.exists():
            owner.unlink()
            candidate.rename(output)
            fsync_dir(output.parent)
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def check_replaceable(output: Path, is_ours: Callable[[Path], bool] | None, inputs: Sequence[Path] = ()) -> None:
    """Refuse to replace ``output`` unless it is what this tool writes and holds no input."""
    if not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory; refusing to replace it")
    if is_ours is None or not is_ours(output):
        raise FileExistsError(f"{output} is not an output of this tool; refusing to delete it with --overwrite. "
                              f"Choose another --out or remove it yourself")
    resolved = output.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise FileExistsError(f"{output} holds the input {item}; refusing to replace it")


class _StopRequest:
    """The SIGTERM a block received, kept beside the SystemExit it raised: Python drops an
    exception raised inside a finaliser (``__del__`` runs at any bytecode), so the swap checks
    this too before it replaces anything."""

    signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


@contextmanager
def _sigterm_raises() -> Iterator[_StopRequest]:
    """SIGTERM becomes SystemExit while the block runs (main thread only), so the scratch
    directory is removed by the normal cleanup path."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum, frame):
        stop.signum = signum
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait while the target is swapped (two renames), so a stop request
    cannot leave the old output renamed away and the new one deleted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


@contextmanager
def atomic_output(output: Path, overwrite: bool = False, is_ours: Callable[[Path], bool] | None = None,
                  inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a scratch sibling directory that replaces ``output`` only if the block succeeds.

    On any exception (SIGTERM included) the scratch directory is removed and ``output`` is
    left untouched. Raises ``FileExistsError`` before any work when ``output`` exists and
    may not be replaced.
    """
    output = Path(output)
    existing = next(p for p in output.parents if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is not a directory: cannot create {output} under it")
    remove_stale_scratch(output)  # first: a swap that died halfway puts the old output back
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        check_replaceable(output, is_ours, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}{_SCRATCH_TAG}", dir=output.parent))
    (scratch / _OWNER_FILE).write_text(owner_tag())
    try:
        with _sigterm_raises() as stop:
            yield scratch
            scratch.chmod(0o755)  # mkdtemp creates it private
            fsync_tree(scratch)  # durable before it replaces anything
            with _signals_held():
                stop.check()
                old = None
                if output.exists():
                    old = output.with_name(f".{output.name}{_SCRATCH_TAG}{_OLD}{owner_tag()}")
                    (output / _OWNER_FILE).write_text(owner_tag())  # renamed back if we die now
                    output.rename(old)  # two renames: the target is never half deleted
                scratch.rename(output)
                (output / _OWNER_FILE).unlink()
                fsync_dir(output.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
