"""Serving latency: in-process ``Recommender.recommend`` and HTTP at 1/8/32 concurrent clients.

    python benchmarks/serving_latency.py [--ckpt PATH]

Histories are real Scientific test histories; the catalog is all 4,385 Scientific items. Without
``--ckpt`` the model is an untrained inductive UniSRec over the real text vectors: the same
arithmetic per request as a trained one. Targets (issue 7): single-request p99 < 20 ms in
process and < 50 ms over HTTP. Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
import httpx
import torch

from unisrec_x.serving.recommender import Recommender, TextSettings


def scientific_recommender(data_root: str | None) -> tuple[Recommender, list[list[str]]]:
    from unisrec_x.data.datamodule import SeqRecDataModule
    from unisrec_x.model.unisrec import UniSRec

    data = SeqRecDataModule("scientific/Scientific", data_root=data_root)
    torch.manual_seed(0)
    net = UniSRec(num_items=data.num_items, plm_dim=data.feature_dim)
    domain = data.data.domains[0]
    rec = Recommender(net, domain.item_tokens, domain.item_texts, data.item_features,
                      TextSettings(data.cache.encoder, data.cache.pooling, data.cache.max_length))
    return rec, test_histories(data, rec)


def test_histories(data, rec: Recommender) -> list[list[str]]:
    test = data.examples("test")
    batch = test[list(range(len(test)))]
    return [[rec.item_tokens[i - 1] for i in row[:n].tolist()] for row, n in zip(batch.item_seq, batch.seq_len)]


def in_process(rec: Recommender, histories: list[list[str]], n: int) -> dict:
    for h in histories[:50]:
        rec.recommend([h], k=10)
    times = []
    for h in histories[:n]:
        start = time.perf_counter()
        rec.recommend([h], k=10)
        times.append(time.perf_counter() - start)
    return summary(times, sum(times))


def summary(times: list[float], wall: float) -> dict:
    ms = [t * 1000 for t in times]
    return {"requests": len(ms), "p50_ms": round(common.percentile(ms, 50), 2),
            "p99_ms": round(common.percentile(ms, 99), 2), "mean_ms": round(sum(ms) / len(ms), 2),
            "throughput_rps": round(len(ms) / wall, 1)}


class Connection:
    """A bare keep-alive HTTP/1.1 client on asyncio streams: a load generator whose own cost is
    small next to the server's (httpx's async pool cost more CPU than the server at 32 clients,
    on the same two cores, and so measured itself)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> "Connection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def http_load(port: int, histories: list[list[str]], clients: int, n: int) -> dict:
    connections = [await Connection("127.0.0.1", port).open() for _ in range(clients)]
    for _ in range(3):  # warm every connection and the server before timing
        await asyncio.gather(*(c.post("/recommend", {"history": h, "k": 10}) for c, h in zip(connections, histories)))
    queue = list(range(n))
    times: list[float] = []

    async def worker(connection: Connection) -> None:
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            status, _ = await connection.post("/recommend", {"history": histories[i % len(histories)], "k": 10})
            times.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"server answered {status}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - start
    for c in connections:
        c.close()
    return summary(times, wall)


def start_server(model_dir: Path, port: int, threads: int | None) -> subprocess.Popen:
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "unisrec_x.cli", "serve", "--ckpt", str(model_dir),
                             "--port", str(port), *extra], cwd=common.ROOT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="trained checkpoint or model directory (default: untrained)")
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--server_threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--peer", default=None, help="a second checkpoint or model directory of the same catalog: "
                        "its in-process latency is measured in turns with --ckpt's, and the ratio printed (e.g. an "
                        "aligned ID model against a text model, issue 30)")
    args = parser.parse_args()
    if args.peer:
        return compare_in_process(args)
    if args.ckpt:
        rec = Recommender.from_checkpoint(args.ckpt, args.data_root)
        from unisrec_x.data.datamodule import SeqRecDataModule

        histories = test_histories(SeqRecDataModule("scientific/Scientific", data_root=args.data_root), rec)
    else:
        rec, histories = scientific_recommender(args.data_root)
    random.Random(0).shuffle(histories)
    figures = {"catalog": rec.num_items, "k": 10, "model": args.ckpt or "untrained inductive UniSRec (same cost)",
               "server_threads": args.server_threads or torch.get_num_threads(),
               "in_process": in_process(rec, histories, args.requests), "http": {}}
    print(f"in process: {figures['in_process']}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = rec.save(Path(tmp) / "model")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = start_server(model_dir, port, args.server_threads)
        try:
            for clients in args.clients:
                result = asyncio.run(http_load(port, histories, clients, args.requests))
                figures["http"][str(clients)] = result
                print(f"http, {clients} clients: {result}")
        finally:
            server.terminate()
            server.wait()
    figures["peak_rss_mb_client"] = round(common.peak_rss_mb())
    common.write_results("serving_latency", figures, "python benchmarks/serving_latency.py " + " ".join(sys.argv[1:]))
    one = figures["http"].get("1", {})
    print(f"RATIOS p99 / target: in-process {figures['in_process']['p99_ms'] / 20:.2f} (target 20 ms), "
          f"HTTP 1 client {one.get('p99_ms', float('nan')) / 50:.2f} (target 50 ms)")


def compare_in_process(args: argparse.Namespace) -> None:
    """``--ckpt`` and ``--peer`` answering the same histories in turns (blocks of 100 requests, so both see
    the same load from whatever else runs), then peer / ckpt for p50 and p99."""
    from unisrec_x.data.datamodule import SeqRecDataModule

    if not args.ckpt:
        raise SystemExit("--peer needs --ckpt: the model it is compared with")
    models = {name: Recommender.from_checkpoint(path, args.data_root) for name, path in (("ckpt", args.ckpt),
                                                                                        ("peer", args.peer))}
    histories = test_histories(SeqRecDataModule("scientific/Scientific", data_root=args.data_root), models["ckpt"])
    random.Random(0).shuffle(histories)
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, rec in models.items():  # warm both
        in_process(rec, histories, 50)
    for start in range(0, args.requests, 100):
        for name, rec in models.items():
            for h in histories[start:start + 100]:
                tick = time.perf_counter()
                rec.recommend([h], k=10)
                times[name].append(time.perf_counter() - tick)
    figures = {"catalog": models["ckpt"].num_items, "k": 10, "ckpt": args.ckpt, "peer": args.peer,
               **{f"in_process_{name}": summary(t, sum(t)) for name, t in times.items()}}
    for name in models:
        print(f"in process, {name}: {figures[f'in_process_{name}']}")
    common.write_results("serving_latency_peer", figures, "python benchmarks/serving_latency.py " + " ".join(sys.argv[1:]))
    ckpt, peer = figures["in_process_ckpt"], figures["in_process_peer"]
    print(f"RATIOS peer / ckpt: p50 {peer['p50_ms'] / ckpt['p50_ms']:.2f}, p99 {peer['p99_ms'] / ckpt['p99_ms']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
