"""The README's commands as a new user runs them: the cluster recipe, extracted from the README and run as
written in a clean shell against a head of its own; and what the jobs say about an output path that would not
outlive a Ray job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _section_block(heading: str) -> str:
    """The first ```bash block under a README heading."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block under '## {heading}'"
    return match.group(1)


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).is_file(), link


@pytest.mark.slow
def test_the_cluster_recipe_runs_as_written(tmp_path: Path) -> None:
    """A copy of the tracked tree (a fresh clone's files) with the project's .venv; the README's block run by
    bash in a clean environment (no RAY_* variables, PATH without the venv); the job's report lands in the
    stated absolute place; the head it started is gone afterwards."""
    venv = REPO / ".venv"
    assert (venv / "bin" / "activate").is_file(), "run the suite through `make test`, which creates .venv"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    clone = tmp_path / "clone"
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    # the clone's own .venv, as `make install` leaves one (a real directory, which .gitignore keeps out of the
    # job's upload), activating the project's environment
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "activate").write_text(f". {venv / 'bin' / 'activate'}\n")
    block = _section_block("On a Ray cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p
        for p in env.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != (venv / "bin").resolve()
    )
    script = "set -euo pipefail\n" + block
    proc = subprocess.run(
        ["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    head_dir = clone / "runs" / "head"
    pid_file = head_dir / "head.pid"
    if proc.returncode != 0 and pid_file.exists():  # stop what the recipe started before failing
        subprocess.run(
            ["bash", "cluster/ray-job.sh", "stop-head", "runs/head"], cwd=clone, env=env, timeout=120
        )
    assert proc.returncode == 0, out[-6000:]
    report = clone / "runs" / "cluster" / "report.md"
    assert report.is_file(), out[-4000:]
    assert "popularity" in report.read_text()
    assert "Job 'first-job' succeeded" in out
    assert "stopped the head started from runs/head" in out
    assert not pid_file.exists()
    log = (head_dir / "head.log").read_text()
    assert "Ray runtime started" in log


def test_a_relative_output_path_inside_a_ray_job_is_refused(tmp_path: Path) -> None:
    """A Ray job runs in Ray's temporary copy of --working-dir (…/runtime_resources/working_dir_files/…):
    every job refuses a relative --out (--feedback-dir for serving) there, before doing any work, and says
    what to give instead; an absolute path passes that check."""
    cwd = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    cwd.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cases = [
        ["jobs.evaluate", "--dataset", "ml-100k", "--models", "popularity", "--out", "runs/eval"],
        ["jobs.finetune", "--dataset", "ml-100k", "--out", "runs/ft"],
        ["jobs.train", "--finetuned", "/nonexistent", "--out", "runs/rl"],
        ["jobs.pipeline", "--stages", "evaluate", "--out", "runs/qs"],
        ["jobs.serve", "--model", "/nonexistent", "--feedback-dir", "runs/fb"],
        ["jobs.loop", "--model", "/nonexistent", "--out", "runs/loop"],
        ["jobs.population", "--target", "a=http://127.0.0.1:1", "--dataset", "ml-100k", "--out", "runs/pop"],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
        flag = args[-2]
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert f"{flag} {args[-1]} is relative" in proc.stderr, proc.stderr[-2000:]
        assert "absolute path" in proc.stderr
    assert list(cwd.iterdir()) == []  # nothing written into the temporary copy
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.serve",
            "--model",
            "/nonexistent",
            "--feedback-dir",
            str(tmp_path / "fb"),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "is relative" not in proc.stderr and "--model /nonexistent does not exist" in proc.stderr
