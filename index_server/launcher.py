"""``ttt-index serve-all``: one local server process per shard, for single-machine runs.

On a cluster, run ``ttt-index serve INDEX --shards i --host 0.0.0.0 --port P`` on each
machine instead; this launcher is the laptop version of that layout.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading

from .manifest import Manifest


def server_command(args: argparse.Namespace, shard: int, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "index_server.cli", "serve", str(args.index), "--shards", str(shard),
           "--port", str(port), "--host", args.host, "--max-k", str(args.max_k), "--max-batch", str(args.max_batch),
           "--max-message-mb", str(args.max_message_mb), "--workers", str(args.workers)]
    for flag, value in (("--nprobe", args.nprobe), ("--ef-search", args.ef_search), ("--token-file", args.token_file),
                        ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def serve_all(args: argparse.Namespace) -> None:
    manifest = Manifest.load(args.index)
    manifest.verify(args.index)
    processes = [
        subprocess.Popen(server_command(args, shard.index, args.base_port and args.base_port + shard.index),
                         stdout=subprocess.PIPE, text=True)
        for shard in manifest.shards
    ]
    addresses = []
    for shard, process in zip(manifest.shards, processes):
        line = process.stdout.readline()  # the server's "serving ... on host:port" line
        if not line.startswith("serving"):
            for p in processes:
                p.terminate()
            raise RuntimeError(f"shard {shard.index} server exited before serving (exit code {process.wait()})")
        addresses.append(line.rsplit(" ", 1)[-1].strip())
        print(line.strip(), flush=True)
    print("index=grpc://" + "+".join(addresses), flush=True)  # ready for --model_args

    stopped = threading.Event()

    def stop(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopped.wait(1.0):
        dead = [(s.index, p.returncode) for s, p in zip(manifest.shards, processes) if p.poll() is not None]
        if dead:
            print(f"shard server(s) exited: {dead}; stopping the others", file=sys.stderr, flush=True)
            break
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        p.wait()
