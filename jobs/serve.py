"""Serve the trained policy over HTTP (Ray Serve) on 127.0.0.1, on an embedded local Ray or a cluster.

Examples::

    python -m jobs.serve --model runs/quickstart/rl/checkpoint          # until Ctrl-C
    python -m jobs.serve --model runs/quickstart/finetune --smoke       # one sample request, then stop
    python -m jobs.serve --model runs/qs/rl/checkpoint --num-gpus 1 --scorer-gpus 0.25 --scorer-replicas 4
    serve run serving/config.yaml                                        # the same app from a Serve config

Then, from another shell::

    curl -s -X POST http://127.0.0.1:8000/recommend -H 'content-type: application/json' \\
         -d '{"user": "196", "k": 5, "explain": true}'

What to expect: the endpoint answers within a minute of start (model and text encoder load once per
replica); feedback (``POST /feedback``) lands as Parquet parts under ``--feedback-dir``, which
``python -m jobs.prepare --dataset feedback --feedback-dir ...`` turns into a dataset for the next round.
Ctrl-C (or ``--seconds``) stops the app cleanly: buffered feedback is flushed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from jobs._common import check_outlives_job, fail, ray_session, setup_logging
from rec_rllib.config import add_model_flags, model_flag_values
from rec_rllib.exposure import ExposureConfig
from serving.settings import STATE_ACTOR, AppArgs

log = logging.getLogger("jobs.serve")
APP_NAME = "rec"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(p, AppArgs, skip=("dataset", "state_name"))  # the app's arguments, as in a Serve config
    p.add_argument("--dataset", help="prepared dataset directory (default: the one the model was trained on)")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        help="the endpoint's port: the app's replica answers HTTP on it itself (direct ingress), else "
        "Serve's proxy",
    )
    p.add_argument(
        "--proxy-port",
        type=int,
        default=None,
        help="Serve's HTTP proxy, one URL for every replica (default: --port with direct ingress off, else "
        "--port + 100)",
    )
    p.add_argument("--address", help="Ray address ('auto' on a cluster); default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("--num-gpus", type=float, default=None, help="(logical) GPUs of the embedded local Ray")
    p.add_argument(
        "--direct-ingress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replicas answer HTTP themselves, on --port (RAY_SERVE_ENABLE_DIRECT_INGRESS=1); default: on "
        "with the embedded Ray; on a cluster set that variable in the environment of `ray start`",
    )
    p.add_argument(
        "--same-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run request code on the replica's own event loop, saving a thread hand-off per call "
        "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0); default: on with the embedded Ray",
    )
    p.add_argument("--smoke", action="store_true", help="send one sample request, print it, stop")
    p.add_argument("--seconds", type=float, default=None, help="serve this long, then stop (default: Ctrl-C)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_dataset(model: str, dataset: str | None) -> str:
    """The dataset (a directory or a built-in name): given, or the one recorded in the model's run config."""
    if dataset:
        return dataset
    run = Path(model)
    for cfg_file in (run / "rl_config.json", run.parent / "rl_config.json"):  # an RL run or its checkpoint
        if cfg_file.exists():
            return json.loads(cfg_file.read_text())["env"]["dataset"]
    cfg_file = run / "config.json"
    if cfg_file.exists():
        meta = json.loads(cfg_file.read_text()).get("dataset", {})
        ref = meta.get("ref") or meta.get("name")
        if ref:  # a directory, or a built-in name (dataset_dir prepares it on first use)
            return ref
    fail(f"cannot tell which dataset {model} was trained on; pass --dataset")
    return ""


def check_app_args(app_args: dict[str, Any]) -> AppArgs:
    """The app's own validation (``serving.app.AppArgs``) before Ray starts: each refused value named by its
    flag."""
    from pydantic import ValidationError

    try:
        return AppArgs(**{"dataset": "", **app_args})  # the dataset is resolved later, from the model
    except ValidationError as e:
        said = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            flag = "--" + name.replace("_", "-")
            said.append(f"{flag}: {err['msg'].lower()}, got {err.get('input')!r}")
        fail("; ".join(said))
        raise


def dataset_dir(ref: str, data_root: str | None) -> str:
    """The prepared dataset directory for ``ref`` (a directory, or a built-in name, prepared on first use as
    the other jobs do); a clear error before anything is deployed when there is none."""
    from rec_rllib.data.catalog import load_or_prepare, prepared_dir

    try:
        load_or_prepare(ref, root=data_root)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--dataset: {e}")
    return prepared_dir(ref, data_root)


def start(app_args: dict[str, Any], port: int) -> str:
    """Deploy the app on the connected Ray (HTTP on 127.0.0.1:port); returns the base URL when ready."""
    from ray import serve

    from serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within 5 minutes")
        time.sleep(0.5)


DIRECT_INGRESS_LINE = "direct ingress: "
"""Prefix of the lines on which :func:`main` prints each replica's own URL (read by
:func:`urls_in_output`)."""


def urls_in_output(output: str) -> list[str]:
    """The replica URLs that ``python -m jobs.serve --direct-ingress`` printed in ``output``."""
    return [
        line[len(DIRECT_INGRESS_LINE) :].strip()
        for line in output.splitlines()
        if line.startswith(DIRECT_INGRESS_LINE)
    ]


def direct_ingress_urls(app: str = APP_NAME, seconds: float = 60) -> list[str]:
    """With direct ingress on, the URLs where the app's ingress replicas answer HTTP themselves (each
    replica binds its own port, 30000-31000 by default); [] when direct ingress is off.

    Read from the Serve controller's target groups (what a load balancer in front of the replicas is
    given; also in the dashboard's ``GET /api/serve/applications/``). The proxy port keeps answering too.
    """
    from ray.serve._private.constants import RAY_SERVE_ENABLE_DIRECT_INGRESS
    from ray.serve.context import _get_global_client

    if not RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return []
    deadline = time.time() + seconds
    while True:
        details = _get_global_client().get_serve_details()
        host = (details.get("http_options") or {}).get("host")  # replicas bind the proxy's host
        urls = [
            f"http://{host if host not in (None, '0.0.0.0', '::') else t['ip']}:{t['port']}"
            for g in details.get("target_groups", [])
            if g.get("app_name") == app and str(g.get("protocol", "")).upper().endswith("HTTP")
            for t in g.get("targets", [])
        ]
        if urls or time.time() > deadline:
            return urls
        time.sleep(0.5)


def stop(state_name: str | None = None) -> None:
    """Delete the app (replicas flush their feedback buffers) and the shared state actor."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from serving.app import shutdown_state

    with contextlib.suppress(RayServeException):  # already stopped
        serve.delete(APP_NAME)  # replicas run __del__: feedback buffers are flushed
    serve.shutdown()
    shutdown_state(state_name or STATE_ACTOR)


def sample_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/recommend", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def sample_user(dataset: str) -> str:
    from serving.catalog import ServingCatalog

    return next(iter(ServingCatalog.from_dataset(dataset).user_histories))


def announce(proxy: str, dataset: str) -> None:
    """Answer one sample request at the endpoint and print it with the curl line that repeats it. The
    endpoint is the first ingress replica's own URL with direct ingress (every replica's is printed, a line
    each, :func:`urls_in_output`, and the proxy's beside them), else the proxy's."""
    replicas = direct_ingress_urls()
    url = replicas[0] if replicas else proxy
    body = {"user": sample_user(dataset), "k": 5, "explain": True}
    answer = sample_request(url, body)
    print(f"\nserving {answer['model_version']} at {url}  (API docs: {url}/docs)")
    if replicas:
        for replica_url in replicas:
            print(f"{DIRECT_INGRESS_LINE}{replica_url}")
        print(f"also through Serve's proxy (one URL for every replica, one hop more): {proxy}")
    print("Try:")
    print(f"  curl -s -X POST {url}/recommend -H 'content-type: application/json' -d '{json.dumps(body)}'")
    for it in answer["items"]:
        why = "; ".join(b["text"] for b in it.get("because") or [])
        print(f"  {it['item_id']:>6}  {it['text'][:55]:55}  because: {why[:70]}")
    sys.stdout.flush()


def fast_path_env(
    port: int, proxy_port: int | None, *, embedded: bool, direct: bool | None, same_thread: bool | None
) -> int:
    """Set up the low-latency serving path for an embedded Ray (before it starts: Serve's controller and
    replicas read these variables): the app's replica answers HTTP on ``port`` itself (direct ingress,
    replicas from ``port`` up) and runs request code on its own event loop. Returns the proxy's port."""
    direct = embedded if direct is None else direct
    same_thread = embedded if same_thread is None else same_thread
    if same_thread:
        os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    if not direct:
        return port if proxy_port is None else proxy_port
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    # a replica that stops keeps answering this long so a load balancer in front can stop sending to it
    # (Serve's default: 30 s); nothing sits in front of an embedded Ray's replicas, so Ctrl-C need not wait
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 99)
    proxy_port = port + 100 if proxy_port is None else proxy_port
    if port <= proxy_port <= port + 99:
        fail(f"--proxy-port {proxy_port} lies in the replicas' own ports ({port}-{port + 99}); pick another")
    return proxy_port


def stop_requested() -> threading.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets, in place of their default handling."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def serve_until_stopped(seconds: float | None) -> None:
    stop_requested().wait(seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    app_args = model_flag_values(args, AppArgs)
    feedback_dir = app_args.setdefault("feedback_dir", AppArgs.model_fields["feedback_dir"].default)
    check_outlives_job(feedback_dir, "--feedback-dir")
    if not Path(args.model).exists():
        fail(f"--model {args.model} does not exist (a jobs.finetune run dir or a jobs.train checkpoint)")
    exposure = check_app_args(app_args)
    try:
        ExposureConfig(
            slots=exposure.exposure_slots,
            pool=exposure.exposure_pool,
            window=exposure.exposure_window,
            refresh=exposure.exposure_refresh,
        )
    except ValueError as e:
        fail(f"--exposure-*: {e}")
    dataset = str(Path(dataset_dir(resolve_dataset(args.model, args.dataset), args.data_root)).resolve())
    if args.address and (args.direct_ingress or args.same_thread):
        fail(
            "--direct-ingress and --same-thread apply to the embedded Ray; on a cluster set "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the "
            "environment of `ray start`"
        )
    proxy_port = fast_path_env(
        args.port,
        args.proxy_port,
        embedded=not args.address,
        direct=args.direct_ingress,
        same_thread=args.same_thread,
    )
    app_args["dataset"] = dataset
    with ray_session(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
        try:
            announce(start(app_args, proxy_port), dataset)
            if not args.smoke:
                print("serving until Ctrl-C" if args.seconds is None else f"serving for {args.seconds:g}s")
                sys.stdout.flush()
                serve_until_stopped(args.seconds)
        finally:
            stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
