"""Benchmark: latency and throughput of /recommend, loopback only, bounded request counts.

    python bench/serve_latency.py --model runs/quickstart/rl/checkpoint --dataset data/ml-100k
    python bench/serve_latency.py --model runs/ft --dataset data/ml-100k --requests 200 --setups inprocess fastapi

Set-ups, same model, same work per request (history lookup, scoring, exploration with propensities,
impression logging):

* ``inprocess`` — the scorer called directly in this process (the floor);
* ``fastapi`` — a plain FastAPI app under uvicorn, no Ray (what a user would pick instead);
* ``serve`` — our Serve app through Serve's default HTTP proxy;
* ``serve-direct`` — our Serve app with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (replicas answer HTTP);
* ``single``, ``single-direct`` — the low-latency settings: ``--topology single`` (one deployment answers
  HTTP and scores in the same replica: no ingress -> scorer hop), ``--batch-wait-ms 0`` (a batch forms
  from what queued while the previous one ran, never by waiting) and ``--same-thread`` (request code on
  the replica's event loop: no thread hand-off).

For each: p50 / p99 latency and requests/s at concurrency 1, 8 and 32 (``--requests`` per level, after a
warm-up). The client runs on the same cores as the server. Servers bind to 127.0.0.1 and are stopped by
PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BODY = {"user": "196", "k": 10, "exploration": "boltzmann", "temperature": 1.0}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(call, concurrency: int, requests: int) -> dict[str, float]:
    lat: list[float] = []
    todo = iter(range(requests))

    async def worker() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": requests / wall,
    }


async def bench_http(url: str, levels: list[int], requests: int) -> dict[int, dict[str, float]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def call() -> None:
            r = await c.post("/recommend", json=BODY)
            if r.status_code != 200:
                raise RuntimeError(r.text)

        await _load(call, 4, 50)  # warm-up
        return {n: await _load(call, n, requests) for n in levels}


async def bench_inprocess(model: str, dataset: str, levels: list[int], requests: int) -> dict:
    from plain_fastapi_app import LocalRecommender

    rec = LocalRecommender(model, dataset)

    async def call() -> None:
        await rec.recommend(dict(BODY))

    await _load(call, 4, 50)
    return {n: await _load(call, n, requests) for n in levels}


def _wait_http(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_server(cmd: list[str], env: dict[str, str], url: str, levels: list[int], requests: int) -> dict:
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_http(url, proc)
        return asyncio.run(bench_http(url, levels, requests))
    finally:
        _stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--setups", nargs="+", default=["inprocess", "fastapi", "serve", "serve-direct", "single", "single-direct"],
        choices=["inprocess", "fastapi", "serve", "serve-direct", "single", "single-direct"],
    )  # fmt: skip
    p.add_argument("--out", default="runs/bench-serve")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'bench'}")
    results: dict[str, dict] = {}
    for setup in args.setups:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        if setup == "inprocess":
            results[setup] = asyncio.run(
                bench_inprocess(args.model, args.dataset, args.levels, args.requests)
            )
        elif setup == "fastapi":
            cmd = [sys.executable, "-m", "uvicorn", "plain_fastapi_app:app", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"]  # fmt: skip
            e = dict(env, BENCH_MODEL=args.model, BENCH_DATASET=args.dataset)
            results[setup] = run_server(cmd, e, url, args.levels, args.requests)
        else:
            cmd = [sys.executable, "-m", "jobs.serve", "--model", args.model, "--dataset", args.dataset,
                   "--port", str(port), "--num-cpus", "2", "--feedback-dir", str(Path(args.out) / "feedback")]  # fmt: skip
            if setup.endswith("-direct"):
                cmd.append("--direct-ingress")
            if setup.startswith("single"):  # the low-latency settings: one hop, no batch wait, no thread hop
                cmd += ["--topology", "single", "--batch-wait-ms", "0", "--same-thread"]
            results[setup] = run_server(cmd, env, url, args.levels, args.requests)
        print(f"{setup}: done", flush=True)
    print("\n| set-up | concurrency | p50 ms | p99 ms | req/s |\n|---|---:|---:|---:|---:|")
    for setup, rows in results.items():
        for n, r in rows.items():
            print(f"| {setup} | {n} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps']:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
