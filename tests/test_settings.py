"""The settings layer: flags generated from the settings dataclasses, one boolean style, unknown keys refused
at any depth, and a run's resolved settings file that runs the same settings again."""

from __future__ import annotations

import json

import pytest

from rec_rllib.config import field_docs, flag_name
from rec_rllib.env import EnvConfig
from rec_rllib.explore import ExplorationConfig
from rec_rllib.finetune import FinetuneConfig
from rec_rllib.models.seqrec import ModelConfig
from rec_rllib.rl.config import RLTrainConfig


def _help(parser) -> str:
    return " ".join(parser.format_help().split())


@pytest.mark.parametrize(
    "job, classes, own",
    [
        ("finetune", (ModelConfig, FinetuneConfig), ()),
        ("train", (RLTrainConfig, ExplorationConfig, EnvConfig), ("finetuned",)),
    ],
)
def test_every_setting_has_a_flag_that_shows_its_doc_and_default(job, classes, own):
    from dataclasses import fields, is_dataclass

    import jobs.finetune
    import jobs.train

    shown = _help({"finetune": jobs.finetune, "train": jobs.train}[job].build_parser())
    for cls in classes:
        docs = field_docs(cls)
        for f in fields(cls):
            name = flag_name(f)
            if name is None or f.name in own or is_dataclass(f.type) or f.name in ("exploration", "env"):
                continue
            assert f"--{name}" in shown, (cls.__name__, f.name)
            first_words = " ".join(docs[f.name].split()[:4])
            assert first_words in shown, (cls.__name__, f.name, first_words)
    assert shown.count("(default:") >= sum(len(fields(c)) for c in classes) - 8


def test_booleans_are_flags_with_a_no_form_in_every_job():
    from jobs.finetune import build_parser as finetune_parser
    from jobs.finetune import resolve_configs
    from jobs.train import build_parser as train_parser

    args = finetune_parser().parse_args(["--out", "x", "--no-progress", "--no-item-bias"])
    model, train = resolve_configs(args)
    assert (train.progress, model.item_bias, model.use_id_embedding) == (False, False, True)
    with pytest.raises(SystemExit):  # the old `--progress false` is refused, not read as a path or ignored
        finetune_parser().parse_args(["--out", "x", "--progress", "false"])
    args = train_parser().parse_args(
        ["--finetuned", "f", "--out", "o", "--cooccurrence", "--no-train-state-head"]
    )
    assert (args.__dict__["env.cooccurrence"], args.__dict__["train_state_head"]) == (True, False)


def test_jobs_serve_flags_are_the_serve_apps_arguments(capsys):
    """Every argument of the Serve app (the ``args`` of a Serve config) is a ``jobs.serve`` flag of the same
    name, its help the argument's description and default; the flags given become the app's arguments, the
    rest keep the app's defaults; a bad value is refused by argparse or named by its flag."""
    from jobs.serve import build_parser, check_app_args
    from rec_rllib.config import model_flag_values
    from serving.settings import AppArgs

    parser = build_parser()
    shown = _help(parser)
    for name, f in AppArgs.model_fields.items():
        if name in ("dataset", "state_name"):  # the job resolves the dataset from the model; one state actor
            continue
        assert f"--{name.replace('_', '-')}" in shown, name
        assert " ".join(f.description.split()[:4]) in shown, name
    assert "--access-log, --no-access-log" in shown and "(default: --access-log)" in shown
    args = parser.parse_args(
        "--model m --topology split --no-access-log --batch-wait-timeout-s 0.002".split()
        + ["--autoscaling", '{"min_replicas": 1, "max_replicas": 3}']
    )
    given = model_flag_values(args, AppArgs)
    assert given == {
        "model": "m",
        "topology": "split",
        "access_log": False,
        "batch_wait_timeout_s": 0.002,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
    }
    app = check_app_args(given)
    defaults = {name: f.default for name, f in AppArgs.model_fields.items() if name not in given}
    assert {name: getattr(app, name) for name in defaults if name != "dataset"} == {
        name: value for name, value in defaults.items() if name != "dataset"
    }
    for bad in (["--topology", "both"], ["--autoscaling", "[1, 2]"], ["--autoscaling", "{"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", *bad])
    with pytest.raises(SystemExit):
        check_app_args({"model": "m", "scorer_gpus": 1.5})
    assert "error: --scorer-gpus: input should be less than or equal to 1" in capsys.readouterr().err


def test_unknown_keys_are_refused_at_every_depth_with_the_known_ones_named():
    with pytest.raises(
        ValueError, match=r"unknown exploration config keys \['strategi'\]; known: .*strategy"
    ):
        RLTrainConfig.from_dict({"exploration": {"strategi": "epsilon"}})
    with pytest.raises(ValueError, match=r"unknown env config keys \['horizn'\]"):
        EnvConfig.from_dict({"horizn": 3})
    with pytest.raises(ValueError, match=r"unknown model config keys \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})


def test_a_runs_resolved_settings_run_the_same_settings_again(tmp_path):
    from jobs.finetune import build_parser as finetune_parser
    from jobs.finetune import resolve_configs
    from jobs.train import build_parser as train_parser
    from jobs.train import resolve_config

    model = ModelConfig(hidden_size=32, num_layers=1, text_model=None, attention="bidirectional")
    train = FinetuneConfig(epochs=3, loss="sampled", progress=False, max_minutes=2.5)
    written = {"kind": "textseqrec", "model": model.to_dict(), "n_items": 10, "train": train.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(written))
    again = resolve_configs(
        finetune_parser().parse_args(["--out", "o", "--config", str(tmp_path / "config.json")])
    )
    assert again == (model, train)
    flagged = finetune_parser().parse_args(
        ["--out", "o", "--config", str(tmp_path / "config.json"), "--epochs", "7"]
    )
    assert resolve_configs(flagged)[1].epochs == 7  # a flag wins over the file

    rl = RLTrainConfig(
        finetuned="runs/ft",
        iterations=3,
        candidate_items=64,
        env_runner_resources={"env_runner": 1.0},
        exploration=ExplorationConfig(strategy="thompson"),
        env=EnvConfig(exposure_cost=0.5, cooccurrence=True),
        cooccurrence_gamma="validation",
    )
    (tmp_path / "rl_config.json").write_text(json.dumps(rl.to_dict()))
    args = train_parser().parse_args(
        ["--finetuned", "runs/ft", "--out", "o", "--config", str(tmp_path / "rl_config.json")]
    )
    assert resolve_config(args) == rl
    args = train_parser().parse_args(
        ["--finetuned", "runs/ft", "--out", "o", "--learner-resource", "learner=2", "--exploration", "ucb"]
    )
    cfg = resolve_config(args)
    assert (cfg.learner_resources, cfg.exploration.strategy) == ({"learner": 2.0}, "ucb")


def test_a_recipe_is_a_settings_file_the_pipeline_and_jobs_train_read_alike():
    from pathlib import Path

    from jobs.pipeline import _rl_config
    from jobs.pipeline import build_parser as pipeline_parser
    from jobs.train import build_parser as train_parser
    from jobs.train import resolve_config

    flags = "--exploration thompson --exposure-cost 0.17 --exposure-shape indicator --exposure-window 5000"
    flags += " --no-train-state-head --no-train-item-terms --cooccurrence --cooccurrence-gamma validation"
    flags += " --horizon 1"
    by_flags = resolve_config(train_parser().parse_args(["--finetuned", "ft", "--out", "o", *flags.split()]))
    by_name = resolve_config(
        train_parser().parse_args(["--finetuned", "ft", "--out", "o", "--recipe", "coverage"])
    )
    assert by_name == by_flags  # the file holds exactly what docs/rl.md spells out flag by flag
    overridden = train_parser().parse_args(
        ["--finetuned", "ft", "--out", "o", "--recipe", "coverage", "--horizon", "3"]
    )
    assert resolve_config(overridden).env.horizon == 3
    piped = _rl_config(pipeline_parser().parse_args([]), Path("ft"))
    placement = ("iterations", "num_env_runners", "num_cpus_per_env_runner", "checkpoint_every", "env")
    assert {k: v for k, v in piped.to_dict().items() if k not in placement} == {
        k: v for k, v in by_name.to_dict().items() if k not in placement
    }
    assert {**piped.to_dict()["env"], "dataset": ""} == {**by_name.to_dict()["env"], "dataset": ""}
