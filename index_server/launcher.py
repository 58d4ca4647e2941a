"""``ttt-index serve-all``: one local server process per shard, for single-machine runs.

A shard server that dies is restarted on the same port (up to ``max_restarts`` times, with
a growing pause) while the others keep serving, so ``failure_policy=degrade`` clients see
one shard missing for a moment, not the whole index. Stopping ``serve-all`` (SIGTERM,
SIGINT) stops every child; if ``serve-all`` itself is killed, the kernel sends its children
SIGTERM (``PR_SET_PDEATHSIG``), so no orphaned server keeps a port.

On a cluster, run ``ttt-index serve INDEX --shards i --host 0.0.0.0 --port P`` on each
machine instead; this launcher is the laptop version of that layout.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children may outlive a killed launcher


@dataclass
class _Child:
    shard: int
    port: int
    process: subprocess.Popen | None = None
    address: str = ""
    restarts: int = 0
    given_up: bool = False


def _start(index: Path, child: _Child, server_args: list[str]) -> str:
    """Start one shard server and return its 'serving ... on host:port' line."""
    cmd = [sys.executable, "-m", "index_server.cli", "serve", str(index), "--shards", str(child.shard),
           "--port", str(child.port), *server_args]
    child.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    line = child.process.stdout.readline()
    if not line.startswith("serving"):
        code = child.process.wait()
        raise RuntimeError(f"shard {child.shard} server exited before serving (exit code {code}); its error is above")
    child.address = line.rsplit(" ", 1)[-1].strip()
    child.port = int(child.address.rsplit(":", 1)[1])
    return line.strip()


def serve_all(index: Path, base_port: int, server_args: list[str], max_restarts: int = 5,
              poll_s: float = 0.5) -> None:
    manifest = Manifest.load(index)  # each server verifies the files (with its --corpus-root) before serving
    children = [_Child(s.index, base_port + s.index if base_port else 0) for s in manifest.shards]
    stopped = threading.Event()

    def stop(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for child in children:
            print(_start(index, child, server_args), flush=True)
        print("index=grpc://" + "+".join(c.address for c in children), flush=True)  # ready for --model_args
        while not stopped.wait(poll_s):
            for child in children:
                code = child.process.poll()
                if code is None or child.given_up:
                    continue
                if child.restarts >= max_restarts:
                    child.given_up = True
                    print(f"shard {child.shard} server keeps exiting (code {code}); leaving it down, the other shards "
                          f"keep serving. Restart it by hand: ttt-index serve {index} --shards {child.shard} "
                          f"--port {child.port}", file=sys.stderr, flush=True)
                    continue
                child.restarts += 1
                pause = min(30.0, 0.5 * 2 ** (child.restarts - 1))
                print(f"shard {child.shard} server exited with code {code}; restarting on port {child.port} in "
                      f"{pause:.1f} s ({child.restarts}/{max_restarts})", file=sys.stderr, flush=True)
                time.sleep(pause)
                try:
                    print(_start(index, child, server_args), flush=True)
                except RuntimeError as e:
                    print(str(e), file=sys.stderr, flush=True)
    finally:
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.process:
                child.process.wait()
