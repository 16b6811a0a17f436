"""The whole pipeline on a real multi-node Ray started with `ray start` (head + two workers on 127.0.0.1),
driven by `ray job submit` and `serve deploy` exactly as on a cluster; then, on a new head, a training job
that resumes from that run's checkpoint."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import REPO, RayNodes

pytestmark = pytest.mark.slow

TINY_FINETUNE = [
    *"--hidden-size 32 --num-layers 1 --num-heads 2 --max-len 30 --dropout 0.1 --epochs 1".split(),
    *"--eval-every 1 --batch-size 128 --lr 3e-3 --warmup-steps 10 --threads 1".split(),
]
TINY_TRAIN = [
    *"--num-envs-per-env-runner 2 --train-batch-size 80 --rollout-fragment-length 20 --window 30".split(),
]


def test_pipeline_script_on_three_nodes_then_training_resumes_on_a_new_head(tmp_path):
    """`bash cluster/local-multinode.sh` (the README's multi-node recipe) with a tiny budget: head + two
    workers, four `ray job submit` jobs, `serve deploy`, an HTTP answer; it stops what it started. Then the
    cluster is gone: a new head (`ray start --head` on 127.0.0.1, as a user types it) and a `ray job submit`
    of jobs.train that resumes from the script's checkpoint."""
    import os
    import subprocess
    import sys

    out = tmp_path / "mn"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        FINETUNE_ARGS=" ".join(TINY_FINETUNE),
        TRAIN_ARGS=" ".join(["--iterations", "2", *TINY_TRAIN]),
    )
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        ["bash", "cluster/local-multinode.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (out / "data" / "ml-100k" / "manifest.json").exists() and (
        out / "ft" / "model.safetensors"
    ).exists()
    assert (out / "rl" / "checkpoint").is_dir()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(metrics) == 3 and all(m["HR@10"] > 0 for m in metrics.values())
    answer = json.loads((out / "answer.json").read_text())
    assert len(answer["items"]) == 5 and answer["model_version"].startswith("rl-")
    assert all(0 < it["propensity"] <= 1 for it in answer["items"])
    assert proc.stdout.count("succeeded") >= 4 and "multi-node pipeline done" in proc.stdout

    # the script's cluster is gone (checked above: it stopped what it started); its checkpoint is on disk
    train = [
        *"python -m jobs.train --address auto --finetuned".split(),
        str(out / "ft"),
        "--dataset",
        str(out / "data" / "ml-100k"),
        "--out",
        str(out / "rl"),
        "--num-env-runners",
        "1",
        "--checkpoint-every",
        "1",
        *TINY_TRAIN,
        "--iterations",
        "4",
        "--resume",
        str(out / "rl" / "checkpoint"),
    ]
    head = RayNodes(head_cpus=2)
    try:
        head.start_head()
        log = head.submit(train)
    finally:
        head.stop()
    assert "resumed from" in log and "at iteration 2" in log
    with open(out / "rl" / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["iteration"])) for r in rows] == [1, 2, 3, 4]


FAKE_RAY = """#!/usr/bin/env bash
# `ray`, except that the first `ray job submit` fails as if the connection dropped: after Ray took the job
# (DROP=taken: submitted with --no-wait) or before (DROP=lost: nothing submitted); with DROP=taken the first
# `ray job logs --follow` then ends at once, the job still running (a log stream that broke off)
if [ "$1 $2" = "job logs" ] && [ "$DROP" = taken ] && [ ! -e "$MARK.logs" ]; then
  touch "$MARK.logs"
  args=(); for a in "$@"; do [ "$a" = --follow ] || args+=("$a"); done
  exec "$REAL_RAY" "${args[@]}"
fi
if [ "$1 $2" = "job submit" ] && [ ! -e "$MARK" ]; then
  touch "$MARK"
  args=("$@"); for i in "${!args[@]}"; do [ "${args[i]}" = "--" ] && break; done
  [ "$DROP" = lost ] || "$REAL_RAY" "${args[@]:0:i}" --no-wait "${args[@]:i}" >/dev/null 2>&1
  echo "ConnectionError: Remote end closed connection without response" >&2
  exit 1
fi
exec "$REAL_RAY" "$@"
"""


def test_safe_submit_follows_a_job_ray_took_and_resubmits_one_it_did_not(tmp_path):
    """`cluster/ray-job.sh submit` (what cluster/local-multinode.sh and RayNodes submit with) against a real
    head: when `ray job submit` fails without saying whether Ray took the job, the job runs exactly once
    either way and its output is shown (followed again when its log stream ends early); a job that fails is
    reported, not rerun. The head runs as on a machine that
    never ran Ray (a home without ~/.ray): it starts with token auth on all the same."""
    import os
    import re
    import subprocess
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    head = RayNodes(head_cpus=1, home=str(home))
    try:
        head.start_head()
        assert (home / ".ray" / "auth_token").is_file()
        # auth on: a request without the token is refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=30)
        assert refused.value.code in (401, 403)

        def run(code: str, drop: str | None) -> subprocess.CompletedProcess:
            env = dict(head.env, REAL_RAY=f"{head.bindir}/ray", DROP=drop or "", MARK=f"{tmp_path}/{drop}")
            if drop:
                env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
            submit = [
                "bash",
                "cluster/ray-job.sh",
                "submit",
                head.dashboard,
                f"rt-{drop}",
                "--working-dir",
                ".",
            ]
            return subprocess.run(
                [*submit, "--", "python", "-c", code],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )

        def runs_of(marker: str) -> int:
            listed = head.cli(["job", "list", "--address", head.dashboard]).stdout
            return len(re.findall(rf"entrypoint=[^,]*{marker}", listed))

        # the taken job outlives its first (broken-off) log stream by 15 s whatever the machine's load: it
        # starts its sleep only once the fake `ray job logs` has run (a fixed 10 s sleep ended first on a
        # loaded machine); no comma in the code (runs_of reads the entrypoint up to one)
        broke = f"{tmp_path}/taken.logs"
        wait = f"any(os.path.exists('{broke}') or time.sleep(0.2) for _ in range(3000))"
        cases = [
            (f"import os; import time; {wait}; time.sleep(15); print('taken-1')", "taken"),
            ("print('lost-1')", "lost"),
            ("raise SystemExit('failing-1')", None),
        ]
        with ThreadPoolExecutor(len(cases)) as pool:  # independent: run together
            taken, lost, failing = pool.map(lambda case: run(*case), cases)
        assert taken.returncode == 0, (taken.stdout + taken.stderr)[-3000:]
        assert "followed after the submit command failed" in taken.stdout and "taken-1" in taken.stdout
        assert "following it again" in taken.stderr, taken.stderr[-3000:]
        assert lost.returncode == 0, (lost.stdout + lost.stderr)[-3000:]
        assert "submitting it again" in lost.stderr and "lost-1" in lost.stdout
        assert failing.returncode != 0, failing.stdout[-3000:]
        assert "Job 'rt-None' failed" in failing.stdout, failing.stdout[-3000:]
        assert [runs_of(m) for m in ("taken-1", "lost-1", "failing-1")] == [1, 1, 1]
    finally:
        head.stop()
