"""The jobs run as a user runs them: as subprocesses, with their documented flags."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, REPO


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("job", ["jobs.prepare", "jobs.evaluate", "jobs.pipeline"])
def test_help_says_how_to_run_and_what_to_expect(job, job_env, tmp_path):
    out = run([job, "--help"], job_env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "python -m " + job in out.stdout
    assert "expect" in out.stdout.lower()


def test_prepare_then_evaluate(job_env, tmp_path):
    out = run(["jobs.prepare", "--dataset", "ml-100k"], job_env, tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "data" / "ml-100k" / "manifest.json").read_text())
    assert manifest["counts"]["interactions"] == 100_000
    out = run(
        [
            *"jobs.evaluate --dataset ml-100k --models popularity random --out ev --exposure-slots".split(),
            *"1".split(),
        ],
        job_env,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) == {"popularity", "random", "popularity+exposure", "random+exposure"}
    widened = metrics["popularity+exposure"]  # the 10th position walks down the chart: more items, same hits
    assert widened["coverage@10"] > metrics["popularity"]["coverage@10"] + 0.015
    assert abs(widened["HR@10"] - metrics["popularity"]["HR@10"]) < 0.01
    assert {"HR@10", "NDCG@10", "MRR@10", "coverage@10", "novelty@10", "diversity@10"} <= set(
        metrics["popularity"]
    )
    assert abs(metrics["popularity"]["HR@10"] - 0.0859) < 0.003
    assert "| popularity |" in (tmp_path / "ev" / "report.md").read_text()
    analysis = json.loads((tmp_path / "ev" / "analysis.json").read_text())
    low, high = analysis["ci95"]["popularity"]["HR@10"][1:]
    assert low < 0.0859 < high and high - low < 0.05
    assert len(analysis["activity_buckets"]["popularity"]) == 3
    paired = analysis["paired"]["random vs popularity"]["HR@10"]
    assert paired["diff"] < 0 and paired["high"] < 0 and paired["p_value"] < 1e-6  # random is clearly worse
    for png in ("metric_bars.png", "accuracy_coverage.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_bad_exposure_settings_by_flag(job_env, tmp_path):
    out = run(
        [
            *"jobs.evaluate --models popularity --exposure-slots 1 --exposure-pool 0 --out ev".split(),
        ],
        job_env,
        tmp_path,
    )
    assert out.returncode != 0 and "--exposure-*" in out.stderr and "pool >= 1" in out.stderr
    assert not (tmp_path / "ev").exists()


def test_evaluate_off_policy_on_obd(job_env, tmp_path):
    """--ope-obd alone (no ranking models): ope.json, the report section and both PNGs."""
    out = run(
        [
            *"jobs.evaluate --models --ope-obd --ope-campaigns all --ope-boot 5 --out ope".split(),
        ],
        job_env,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    ope = json.loads((tmp_path / "ope" / "ope.json").read_text())
    assert set(ope["settings"]) == {
        f"all/{d}/{b}" for d in ("random->bts", "bts->random") for b in ("prior", "empirical")
    }
    setting = ope["settings"]["all/random->bts/prior"]
    assert setting["truth"] == pytest.approx(0.0042)
    assert set(setting["errors"]) == {"dm", "ips", "snips", "dr", "sndr", "switch-dr", "slope"}
    assert len(setting["estimates"]["ips"]) == 5
    report = (tmp_path / "ope" / "report.md").read_text()
    assert "Off-policy estimators" in report and "obp published" in report
    for png in ("ope_vs_truth.png", "ope_relative_error.png"):
        assert (tmp_path / "ope" / png).stat().st_size > 10_000


def test_prepare_custom_bad_file_fails_clearly_and_keeps_the_old_dataset(job_env, tmp_path):
    good = tmp_path / "logs.csv"
    good.write_text("u,i,t,r\n1,10,100,5\n1,11,101,4\n1,12,102,3\n")
    args = [
        "jobs.prepare",
        "--dataset",
        "custom",
        "--interactions",
        str(good),
        *"--user-col u --item-col i --time-col t --reward-col r --name mine".split(),
    ]
    assert run(args, job_env, tmp_path).returncode == 0
    manifest = tmp_path / "data" / "mine" / "manifest.json"
    before = manifest.read_text()
    good.write_text("u,i,t,r\n1,10,100,5\n1,11,-7,4\n")
    out = run(args, job_env, tmp_path)
    assert out.returncode == 2
    assert "logs.csv, row 1 (line 3), field 't': negative timestamp" in out.stderr
    assert "Traceback" not in out.stderr
    assert manifest.read_text() == before


def test_train_refuses_a_resume_that_is_not_a_checkpoint_before_writing_anything(
    job_env, tmp_path, finetuned_run
):
    """`jobs.train --resume <a fine-tuned run>` (a directory, but not an algorithm checkpoint): a clear error
    that names the flag, the path and what is missing, before Ray starts or the output directory is
    touched."""
    out = run(
        ["jobs.train", "--finetuned", finetuned_run, "--out", "rl", "--resume", finetuned_run],
        job_env,
        tmp_path,
    )
    assert out.returncode != 0
    said = out.stderr.strip().splitlines()[-1]
    assert said.startswith("error: --resume:") and finetuned_run in said and "algorithm_state.pkl" in said, (
        said
    )
    assert "Traceback" not in out.stderr and not (tmp_path / "rl").exists()


@pytest.mark.parametrize(
    "args, flag, out",
    [
        (
            ["jobs.finetune", "--dataset", "ml-100k", "--out", "ft", "--text-model", "{tmp}/no-model"],
            "--text-model",
            "ft",
        ),
        (["jobs.serve", "--model", "{run}", "--dataset", "{tmp}/no-data", "--smoke"], "--dataset", None),
        (
            ["jobs.evaluate", "--models", "popularity", "--out", "ev", "--ope-serve-log", "{tmp}/no-log"],
            "--ope-serve-log",
            "ev",
        ),
    ],
    ids=["finetune-text-model", "serve-dataset", "evaluate-serve-log"],
)
def test_a_bad_path_is_refused_before_any_work(args, flag, out, job_env, tmp_path, finetuned_run):
    """A text model that cannot be loaded, a dataset that is not prepared, a feedback directory without
    impressions: one line that names the flag and the path, before training, deploying or evaluating, and no
    output written."""
    args = [a.format(tmp=tmp_path, run=finetuned_run) for a in args]
    bad = next(a for a in args if a.startswith(str(tmp_path)))
    done = run(args, job_env, tmp_path)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(f"error: {flag}:") and bad in said, said
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert out is None or not (tmp_path / out).exists()


def test_train_on_the_embedded_ray_refuses_resources_no_node_offers(job_env, tmp_path, finetuned_run):
    """Env runners that ask for a custom resource the embedded Ray cannot offer would wait forever: a clear
    error instead, after Ray started and before training, with nothing written."""
    args = [
        "jobs.train",
        "--finetuned",
        finetuned_run,
        "--out",
        "rl",
        "--env-runner-resource",
        "env_runner=1",
    ]
    done = run(args, job_env, tmp_path)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("error: no node of this Ray offers ['env_runner']"), said
    assert not (tmp_path / "rl").exists()


def test_train_config_file_refuses_an_unknown_setting(tmp_path, finetuned_run):
    """A typo in `jobs.train --config` is an error that names it (it was silently ignored); a run's own
    rl_config.json-style file (nested env / exploration) is read."""
    from jobs.train import build_parser, resolve_config

    path = tmp_path / "rl.yaml"
    args = build_parser().parse_args(["--finetuned", finetuned_run, "--out", "rl", "--config", str(path)])
    path.write_text("iteratons: 5\n")
    with pytest.raises(ValueError, match=r"unknown RL config keys \['iteratons'\]"):
        resolve_config(args)
    path.write_text("env: {horizn: 2}\n")  # inside a section too
    with pytest.raises(ValueError, match=r"unknown env config keys \['horizn'\]"):
        resolve_config(args)
    path.write_text("iterations: 5\nenv: {horizon: 2}\nexploration: {strategy: thompson}\n")
    cfg = resolve_config(args)
    assert (cfg.iterations, cfg.env.horizon, cfg.exploration.strategy) == (5, 2, "thompson")
    assert not cfg.env.cooccurrence  # off unless asked for, by the file or by the flag (which wins)
    flagged = build_parser().parse_args(
        [
            "--finetuned",
            finetuned_run,
            "--out",
            "rl",
            "--config",
            str(path),
            "--cooccurrence",
            "--horizon",
            "1",
            "--cooccurrence-window",
            "3",
        ]
    )
    cfg = resolve_config(flagged)
    assert (cfg.env.cooccurrence, cfg.env.horizon, cfg.env.cooccurrence_window) == (True, 1, 3)
    assert cfg.cooccurrence_gamma is None  # learned unless fixed
    base = ["--finetuned", finetuned_run, "--out", "rl", "--cooccurrence"]
    for given, expected in (("validation", "validation"), ("1.5", 1.5)):
        assert (
            resolve_config(
                build_parser().parse_args([*base, "--cooccurrence-gamma", given])
            ).cooccurrence_gamma
            == expected
        )
    with pytest.raises(SystemExit):  # argparse: "expected a number >= 0 or 'validation'"
        build_parser().parse_args([*base, "--cooccurrence-gamma", "best"])


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["jobs.pipeline", "--out", "qs", "--rl-iterations", "0"],
            "error: train stage: iterations must be a number >= 1",
        ),
        (
            ["jobs.pipeline", "--out", "qs", "--max-len", "0"],
            "error: finetune stage: max_len must be a number >= 1",
        ),
        (
            ["jobs.serve", "--model", "{run}", "--scorer-replicas", "0", "--smoke"],
            "error: --scorer-replicas: input should",
        ),
        (
            ["jobs.evaluate", "--models", "popularity", "--out", "qs", "--ope-max-rounds", "0"],
            "error: --ope-max-rounds must be >= 1",
        ),
    ],
    ids=["pipeline-rl-iterations", "pipeline-max-len", "serve-scorer-replicas", "evaluate-ope-max-rounds"],
)
def test_a_setting_that_cannot_run_is_refused_before_any_work(args, says, job_env, tmp_path, finetuned_run):
    """The pipeline checks every stage's settings before its first stage (an RL setting was refused only after
    the fine-tune; --max-len 0 was silently ignored), jobs.serve the app's before Ray starts (a pydantic
    traceback from inside the deployment before)."""
    done = run([a.format(run=finetuned_run) for a in args], job_env, tmp_path)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(says), said
    assert "Traceback" not in done.stderr and not (tmp_path / "qs").exists()


def test_evaluate_rejects_unknown_model(job_env, tmp_path):
    out = run(["jobs.evaluate", "--models", "sasrec9000", "--out", "x"], job_env, tmp_path)
    assert out.returncode == 2 and "unknown model" in out.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pipeline_rl_recipes():
    """``coverage`` (the default) trains the exposure weight alone under the measured exposure cost;
    ``relevance`` is jobs.train's default training on the hit reward."""
    from jobs.pipeline import _rl_config, build_parser
    from jobs.train import build_parser as train_parser
    from jobs.train import resolve_config

    args = build_parser().parse_args([])
    cov = _rl_config(args, Path("ft"))
    assert (cov.iterations, cov.train_state_head, cov.train_item_terms) == (300, False, False)
    assert cov.exploration.strategy == "thompson"
    env = cov.env
    assert (env.exposure_cost, env.exposure_shape, env.exposure_window) == (0.17, "indicator", 5000)
    assert (env.cooccurrence, env.horizon, env.cooccurrence_window, cov.cooccurrence_gamma) == (
        True,
        1,
        5,
        "validation",
    )
    rel_args = build_parser().parse_args(["--rl-recipe", "relevance", "--rl-iterations", "7"])
    rel = _rl_config(rel_args, Path("ft"))
    default = resolve_config(train_parser().parse_args(["--finetuned", "ft", "--out", "rl"]))
    assert (rel.iterations, rel.env.exposure_cost) == (7, 0) and rel.train_state_head and rel.train_item_terms
    placement = {"finetuned", "iterations", "num_cpus_per_env_runner", "checkpoint_every", "env"}
    assert {k: v for k, v in rel.to_dict().items() if k not in placement} == {
        k: v for k, v in default.to_dict().items() if k not in placement
    }
    assert {**rel.to_dict()["env"], "dataset": ""} == {**default.to_dict()["env"], "dataset": ""}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--rl-recipe", "ctr"])


@pytest.mark.slow
def test_pipeline_end_to_end_on_embedded_ray(job_env, tmp_path):
    """The README's main command, as a subprocess (tiny budgets): embedded Ray, real data, every stage."""
    port = _free_port()
    tiny = [
        *"--finetune-epochs 2 --hidden-size 32 --max-len 30 --rl-iterations 2 --serve-seconds 0".split(),
        *"--port".split(),
        str(port),
    ]
    cmd = ["jobs.pipeline", "--out", "runs/qs", "--num-cpus", "2", *tiny]
    out = run(cmd, job_env, tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "qs" / "metrics.json").read_text())
    assert abs(metrics["popularity"]["NDCG@10"] - 0.0449) < 0.003
    policies = {"fine-tuned (finetune)", "rl-policy (rl)"}
    assert set(metrics) == {"popularity", "random", *policies, *(p + " + exposure slot" for p in policies)}
    for p in policies:  # the exposure slot widens the catalogue the lists cover
        assert metrics[p + " + exposure slot"]["coverage@10"] > metrics[p]["coverage@10"]
    assert (tmp_path / "runs" / "qs" / "rl" / "checkpoint").is_dir()
    rl_cfg = json.loads((tmp_path / "runs" / "qs" / "rl" / "rl_config.json").read_text())
    # the coverage recipe
    assert rl_cfg["env"]["exposure_shape"] == "indicator" and not rl_cfg["train_item_terms"]
    chosen = json.loads((tmp_path / "runs" / "qs" / "rl" / "cooccurrence_gamma.json").read_text())
    assert rl_cfg["cooccurrence_gamma"] == chosen["gamma"]  # the RL run's γ: the validation users' best
    assert chosen["figures"][f"{chosen['gamma']:g}"] == max(chosen["figures"].values())
    assert f"curl -s -X POST http://127.0.0.1:{port}/recommend" in out.stdout and "because:" in out.stdout
    # the fast path by default: the app's replica answers on --port itself; Serve's proxy answers too
    assert f"direct ingress: http://127.0.0.1:{port}" in out.stdout
    assert (
        f"also through Serve's proxy (one URL for every replica, one hop more): http://127.0.0.1:{port + 100}"
        in (out.stdout)
    )
    # even two epochs of the text-aware model beat random by far
    assert metrics["fine-tuned (finetune)"]["HR@10"] > 3 * metrics["random"]["HR@10"]
    assert (tmp_path / "runs" / "qs" / "temporal-test" / "metrics.json").exists()
    assert (tmp_path / "data" / "obd-all" / "manifest.json").exists()


def test_repo_root_is_importable():
    assert (REPO / "jobs" / "pipeline.py").exists()
