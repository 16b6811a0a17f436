"""The whole pipeline on a real multi-node Ray started with `ray start` (head + two workers on 127.0.0.1),
driven by `ray job submit` and `serve deploy` exactly as on a cluster; then, on a new head, a training job
that resumes from that run's checkpoint."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import REPO, RayNodes

pytestmark = pytest.mark.slow

TINY_FINETUNE = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--max-len", "30",
                 "--dropout", "0.1", "--epochs", "1", "--eval-every", "1", "--batch-size", "128",
                 "--lr", "3e-3", "--warmup-steps", "10", "--threads", "1"]  # fmt: skip
TINY_TRAIN = ["--num-envs-per-env-runner", "2", "--train-batch-size", "80", "--rollout-fragment-length", "20",
              "--window", "30"]  # fmt: skip


def test_pipeline_script_on_three_nodes_then_training_resumes_on_a_new_head(tmp_path):
    """`bash cluster/local-multinode.sh` (the README's multi-node recipe) with a tiny budget: head + two
    workers, four `ray job submit` jobs, `serve deploy`, an HTTP answer; it stops what it started. Then the
    cluster is gone: a new head (`ray start --head` on 127.0.0.1, as a user types it) and a `ray job submit`
    of jobs.train that resumes from the script's checkpoint."""
    import os
    import subprocess
    import sys

    out = tmp_path / "mn"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FINETUNE_ARGS=" ".join(TINY_FINETUNE),
               TRAIN_ARGS=" ".join(["--iterations", "2", *TINY_TRAIN]))  # fmt: skip
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", "cluster/local-multinode.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
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
    train = ["python", "-m", "jobs.train", "--address", "auto", "--finetuned", str(out / "ft"), "--dataset",
             str(out / "data" / "ml-100k"), "--out", str(out / "rl"), "--num-env-runners", "1",
             "--checkpoint-every", "1", *TINY_TRAIN, "--iterations", "4",
             "--resume", str(out / "rl" / "checkpoint")]  # fmt: skip
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
