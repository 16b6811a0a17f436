"""Benchmark: latency and throughput of /recommend, loopback only, bounded request counts.

    python bench/serve_latency.py --model runs/quickstart/rl/checkpoint --dataset data/ml-100k
    python bench/serve_latency.py --model runs/ft --dataset data/ml-100k --requests 200 \\
        --setups inprocess fastapi

Set-ups, same model, same work per request (history lookup, scoring, exploration with propensities,
impression logging):

* ``default`` — ``python -m jobs.serve`` with no set-up flags, what ``make run`` serves (today the same as
  ``single-direct``), loaded at the URL it prints;
* ``inprocess`` — the scorer called directly in this process (the floor);
* ``fastapi`` — a plain FastAPI app under uvicorn, no Ray (what a user would pick instead);
* ``serve`` — our Serve app through Serve's default HTTP proxy;
* ``serve-direct`` — our Serve app with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: the ingress replica answers
  HTTP on its own port (printed by ``jobs.serve`` as "direct ingress: <url>"), and the load goes there;
* ``single``, ``single-direct`` — the low-latency settings: ``--topology single`` (one deployment answers
  HTTP and scores in the same replica: no ingress -> scorer hop), ``--batch-wait-timeout-s 0`` (a batch forms
  from what queued while the previous one ran, never by waiting) and ``--same-thread`` (request code on
  the replica's event loop: no thread hand-off);
* ``single-direct-quiet`` — ``single-direct`` without Serve's per-request access log (``--no-access-log``).

``--rounds N`` runs every set-up N times, interleaved, each on a fresh server, and reports medians: on 2
shared cores one run's figures move by 10-30%.

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

from rec_rllib.explore import STRATEGIES

REPO = Path(__file__).resolve().parents[1]

BODY = {"user": "196", "k": 10, "exploration": "boltzmann", "temperature": 1.0}
CLIENT = {"wrk_seconds": 0.0}
"""Set from the command line: seconds per level of wrk, or 0 for the in-process aiohttp client."""


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
    """Load with aiohttp (installed with Ray Serve), one keep-alive connection per concurrent worker.

    httpx was the first client here; at 32 connections its own CPU cost and pool contention (on the cores
    the server shares) capped every server near 250-400 req/s and added 0.5 s tails, so it measured the
    client more than the servers.
    """
    import aiohttp

    body = json.dumps(BODY).encode()
    headers = {"content-type": "application/json"}
    results = {}
    for n in [4, *levels]:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(url, connector=connector) as session:

            async def call() -> None:
                async with session.post("/recommend", data=body, headers=headers) as r:
                    text = await r.read()
                    if r.status != 200:
                        raise RuntimeError(text.decode(errors="replace"))

            await _load(call, n, min(50, requests))  # warm-up: open the connections
            if n in levels:
                results[n] = await _load(call, n, requests)
    return results


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
"""


def _wrk_ms(text: str) -> float:
    """wrk's latency figure ("850.00us", "2.10ms", "1.02s") in milliseconds."""
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"not a wrk latency: {text!r}")


def bench_wrk(url: str, levels: list[int], seconds: float) -> dict[int, dict[str, float]]:
    """Load with wrk, an external load generator in C (`apt-get install wrk`): ``seconds`` per level after a
    2-second warm-up, one connection per concurrent request, p50/p99 from its latency distribution."""
    import re
    import shutil
    import tempfile

    if shutil.which("wrk") is None:
        raise SystemExit("--client wrk needs wrk on PATH (Debian/Ubuntu: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % json.dumps(BODY))
        script = f.name
    results = {}
    for n in [4, *levels]:
        cmd = [
            "wrk",
            f"-t{min(n, 2)}",
            f"-c{n}",
            f"-d{2 if n not in levels else seconds:g}s",
            "--latency",
            "-s",
            script,
            url + "/recommend",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        if n not in levels:
            continue
        if "Non-2xx" in out:
            raise RuntimeError(f"wrk saw failed requests:\n{out}")
        pct = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if rps is None or not {"50", "99"} <= set(pct):
            raise RuntimeError(f"cannot read wrk's figures at c={n}:\n{out}")
        results[n] = {"p50_ms": _wrk_ms(pct["50"]), "p99_ms": _wrk_ms(pct["99"]), "rps": float(rps.group(1))}
    os.unlink(script)
    return results


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


def _direct_url(log: Path, proc: subprocess.Popen, seconds: float = 120) -> str:
    """The replica's own HTTP address, as ``jobs.serve`` prints it ("direct ingress: <url>")."""
    from jobs.serve import urls_in_output

    deadline = time.time() + seconds
    while time.time() < deadline:
        urls = urls_in_output(log.read_text())
        if urls:
            return urls[0]
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress address in {log}")


def run_server(
    cmd: list[str], env: dict[str, str], url: str, levels: list[int], requests: int, log: Path, direct: bool
) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_http(url, proc)
        if direct:  # the replica answers on its own port: load that, not the proxy's
            url = _direct_url(log, proc)
        if CLIENT["wrk_seconds"]:
            return bench_wrk(url, levels, CLIENT["wrk_seconds"])
        return asyncio.run(bench_http(url, levels, requests))
    finally:
        _stop(proc)


SETUPS = [
    *"inprocess fastapi default serve serve-direct single single-direct single-direct-quiet".split(),
]


def run_setup(setup: str, args, env: dict[str, str], rnd: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.out) / f"{setup}-{rnd}.log"
    if setup == "inprocess":
        return asyncio.run(bench_inprocess(args.model, args.dataset, args.levels, args.requests))
    if setup == "fastapi":
        cmd = [
            sys.executable,
            *"-m uvicorn plain_fastapi_app:app --host 127.0.0.1 --port".split(),
            str(port),
            "--log-level",
            "warning",
        ]
        e = dict(env, BENCH_MODEL=args.model, BENCH_DATASET=args.dataset)
        return run_server(cmd, e, url, args.levels, args.requests, log, False)
    cmd = [
        sys.executable,
        "-m",
        "jobs.serve",
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--feedback-dir",
        str(Path(args.out) / "feedback"),
    ]
    if setup == "default":  # what `make run` and a plain `python -m jobs.serve` serve
        return run_server(cmd, env, url, args.levels, args.requests, log, True)
    direct = "-direct" in setup
    cmd.append("--direct-ingress" if direct else "--no-direct-ingress")
    if setup.startswith("single"):  # the low-latency settings: one hop, no batch wait, no thread hop
        cmd += ["--topology", "single", "--batch-wait-timeout-s", "0", "--same-thread"]
    else:
        cmd += ["--topology", "split", "--batch-wait-timeout-s", "0.002", "--no-same-thread"]
    if setup.endswith("-quiet"):
        cmd.append("--no-access-log")
    return run_server(cmd, env, url, args.levels, args.requests, log, direct)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--setups", nargs="+", default=SETUPS, choices=SETUPS)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every set-up this many times, interleaved (a fresh server each time); the table shows "
        "medians over rounds and the req/s range",
    )
    p.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="niceness of Ray's worker processes (Ray's own default: 15); the client shares the cores",
    )
    p.add_argument(
        "--exploration",
        default=BODY["exploration"],
        choices=STRATEGIES,
        help="the requests' exploration mode",
    )
    p.add_argument(
        "--client",
        choices=["aiohttp", "wrk"],
        default="aiohttp",
        help="aiohttp: --requests per level from this process; wrk: the external load generator, "
        "--wrk-seconds per level (the in-process set-up always uses direct calls)",
    )
    p.add_argument("--wrk-seconds", type=float, default=10.0)
    p.add_argument(
        "--user",
        default=BODY["user"],
        help="the user every request asks for (its history length sets the encoder's share of the cost)",
    )
    p.add_argument("--out", default="runs/bench-serve")
    args = p.parse_args()
    BODY["exploration"] = args.exploration
    BODY["user"] = args.user
    CLIENT["wrk_seconds"] = args.wrk_seconds if args.client == "wrk" else 0.0
    # a replica answering HTTP itself drains for 30 s before it stops (for load balancers); not needed here.
    # Ray starts its workers at niceness 15 (so raylet and GCS keep the CPU); with the load generator on
    # the same 2 cores that hands the client the CPU whenever both want it, which no server of the
    # comparison suffers from (uvicorn runs at 0). --ray-niceness 0 (default) runs replicas at 0 as well.
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'bench'}",
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1",
        RAY_worker_niceness=str(args.ray_niceness),
    )
    runs: dict[str, list[dict]] = {s: [] for s in args.setups}
    for rnd in range(args.rounds):
        for setup in args.setups:
            runs[setup].append(run_setup(setup, args, env, rnd))
            print(f"round {rnd + 1}/{args.rounds} {setup}: done", flush=True)
    results: dict[str, dict] = {}
    print("\n| set-up | concurrency | p50 ms | p99 ms | req/s | req/s range |\n|---|---:|---:|---:|---:|---|")
    for setup, rounds in runs.items():
        results[setup] = {}
        for n in args.levels:
            rows = [r[n] for r in rounds]
            med = {k: float(np.median([r[k] for r in rows])) for k in ("p50_ms", "p99_ms", "rps")}
            rps = [r["rps"] for r in rows]
            results[setup][n] = {**med, "rounds": rows}
            print(
                f"| {setup} | {n} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | {med['rps']:.0f} "
                f"| {min(rps):.0f}-{max(rps):.0f} |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
