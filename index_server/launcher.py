"""Shard server processes: ``start_shard_server`` (one process from a ``ServerConfig``, its
address read from its serving line) and ``ttt-index serve-all`` (one per shard, for
single-machine runs).

A child gets its ``ServerConfig`` whole, as JSON on its standard input (``python -m
index_server.launcher``), so every server setting reaches it and the token never appears
on a command line.

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
import dataclasses
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .manifest import Manifest
from .server import ServerConfig, serve

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS = 5  # of one shard server that keeps dying, before serve-all leaves it down


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children may outlive a killed launcher


@dataclass
class ShardProcess:
    """A running shard server: its process, its ``host:port`` and the line it printed."""

    process: subprocess.Popen
    address: str
    line: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the server drains in-flight requests), then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.process.stdout.close()
        return code


def start_shard_server(config: ServerConfig, die_with_parent: bool = True) -> ShardProcess:
    """Start ``serve(config)`` in a child process and return once it serves; raises
    RuntimeError (its error is on stderr) if it exits first."""
    process = subprocess.Popen([sys.executable, "-m", "index_server.launcher"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True,
                               preexec_fn=_die_with_parent if die_with_parent else None)
    process.stdin.write(config.to_json())
    process.stdin.close()
    line = process.stdout.readline()
    if not line.startswith("serving"):
        code = process.wait()
        process.stdout.close()
        raise RuntimeError(f"shard server for shards {config.shards} exited before serving (exit code {code}); its "
                           f"error is above")
    return ShardProcess(process, line.rsplit(" ", 1)[-1].strip(), line.strip())


@dataclass
class _Child:
    config: ServerConfig
    server: ShardProcess | None = None
    restarts: int = 0
    given_up: bool = False

    @property
    def shard(self) -> int:
        return self.config.shards[0]

    def start(self) -> str:
        self.server = start_shard_server(self.config)
        self.config = dataclasses.replace(self.config, port=self.server.port)  # a restart reuses the port
        return self.server.line


def serve_all(config: ServerConfig, base_port: int, max_restarts: int = MAX_RESTARTS, poll_s: float = 0.5) -> None:
    """One server per shard of ``config.index`` (shard i on ``base_port + i``; 0: free ports),
    each with ``config`` otherwise, until SIGTERM or SIGINT."""
    manifest = Manifest.load(config.index)  # each server verifies the files (with its corpus root) before serving
    children = [_Child(dataclasses.replace(config, shards=(s.index,), port=base_port + s.index if base_port else 0))
                for s in manifest.shards]
    stopped = threading.Event()

    def stop(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for child in children:
            print(child.start(), flush=True)
        print("index=grpc://" + "+".join(c.server.address for c in children), flush=True)  # ready for --model_args
        while not stopped.wait(poll_s):
            for child in children:
                code = child.server.process.poll()
                if code is None or child.given_up:
                    continue
                if child.restarts >= max_restarts:
                    child.given_up = True
                    print(f"shard {child.shard} server keeps exiting (code {code}); leaving it down, the other shards "
                          f"keep serving. Restart it by hand: ttt-index serve {config.index} --shards {child.shard} "
                          f"--port {child.config.port}", file=sys.stderr, flush=True)
                    continue
                child.restarts += 1
                pause = min(30.0, 0.5 * 2 ** (child.restarts - 1))
                print(f"shard {child.shard} server exited with code {code}; restarting on port {child.config.port} in "
                      f"{pause:.1f} s ({child.restarts}/{max_restarts})", file=sys.stderr, flush=True)
                time.sleep(pause)
                try:
                    print(child.start(), flush=True)
                except RuntimeError as e:
                    print(str(e), file=sys.stderr, flush=True)
    finally:
        for child in children:
            if child.server and child.server.process.poll() is None:
                child.server.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.server:
                child.server.process.wait()


if __name__ == "__main__":  # a child of start_shard_server: its configuration arrives on stdin
    serve(ServerConfig.from_json(sys.stdin.read()))
