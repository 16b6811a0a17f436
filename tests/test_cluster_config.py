"""The cluster files pass Ray's own validators."""

from __future__ import annotations

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


def test_ray_cluster_yaml_passes_rays_schema_validation():
    config = prepare_config(yaml.safe_load((REPO / "ray-cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema violation
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    # token auth on every node: the token copied there, Ray started in token mode
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if " start " in f" {c} "]
        assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start ") for c in starts), config[key]
    assert "env_runner" in types["cpu_worker"]["resources"]
    assert {"learner", "serve"} <= set(types["gpu_worker"]["resources"])


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["env_vars"]["REC_RLLIB_DATA"]


# -- KubeRay manifests and Serve configs --------------------------------------------------------------------
CLUSTER = REPO / "cluster"


def _manifest(name: str) -> dict:
    doc = yaml.safe_load((CLUSTER / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1", name
    return doc


def _group_resources(cluster_spec: dict) -> dict[str, dict[str, float]]:
    """groupName -> custom resources, checking the fields KubeRay requires of every group."""
    import json

    assert cluster_spec["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 runs it with token auth
    head = cluster_spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:2.60.0")
    out = {}
    for group in cluster_spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(
            group
        )
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["name"] and container["image"].startswith("rayproject/ray:2.60.0")
        raw = group["rayStartParams"].get("resources", '"{}"')
        out[group["groupName"]] = json.loads(json.loads(raw))  # KubeRay's quoted-JSON form
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == container["image"].endswith("-gpu"), group["groupName"]
    return out


def _serve_schema(config: dict):
    """Serve's own schema, plus a check it leaves out: no deployment option it does not know (a typo
    such as ``max_ongoing_requestz`` is otherwise accepted and silently ignored)."""
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    known = set(DeploymentSchema.model_fields)
    for app in config["applications"]:
        for d in app["deployments"]:
            assert set(d) <= known, f"unknown deployment options {set(d) - known}"
    return ServeDeploySchema.model_validate(config)


def test_serve_configs_pass_serves_schema():
    from serving.app import AppArgs

    for name, deployments in (
        ("config.yaml", {"RecIngress", "PolicyScorer"}),
        ("config-gpu.yaml", {"RecIngress", "PolicyScorer"}),
        ("config-latency.yaml", {"RecService"}),
    ):
        schema = _serve_schema(yaml.safe_load((REPO / "serving" / name).read_text()))
        app = schema.applications[0]
        assert app.import_path == "serving.app:build_app"
        assert {d.name for d in app.deployments} == deployments
        args = AppArgs(**app.args)  # the builder's own argument model accepts them
        assert (args.topology == "single") == (deployments == {"RecService"})


def test_kuberay_raycluster_matches_the_cluster_launcher_groups():
    doc = _manifest("raycluster.yaml")
    assert doc["kind"] == "RayCluster"
    groups = _group_resources(doc["spec"])
    launcher = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())["available_node_types"]
    assert groups["cpu-workers"] == launcher["cpu_worker"]["resources"]
    assert groups["gpu-workers"] == launcher["gpu_worker"]["resources"]


def test_kuberay_rayjob_runs_real_entry_points_with_known_resources():
    """Every `python -m jobs.X ...` in the RayJob entrypoint parses with that job's own parser, and the
    custom resources it asks for exist in the job's worker groups."""
    import importlib
    import shlex

    from ray.runtime_env import RuntimeEnv

    doc = _manifest("rayjob-train.yaml")
    assert doc["kind"] == "RayJob" and doc["spec"]["shutdownAfterJobFinishes"] is True
    groups = _group_resources(doc["spec"]["rayClusterSpec"])
    offered = {name for res in groups.values() for name in res}
    RuntimeEnv(**yaml.safe_load(doc["spec"]["runtimeEnvYAML"]))
    commands = [shlex.split(c) for c in doc["spec"]["entrypoint"].split("&&")]
    assert [c[2] for c in commands] == ["jobs.prepare", "jobs.finetune", "jobs.train", "jobs.evaluate"]
    for argv in commands:
        assert argv[:2] == ["python", "-m"]
        args = importlib.import_module(argv[2]).build_parser().parse_args(argv[3:])
        if argv[2] == "jobs.train":
            assert args.address == "auto"
            from jobs.train import resolve_config

            cfg = resolve_config(args)
            asked = {*cfg.env_runner_resources, *cfg.learner_resources}
            assert asked == {"env_runner", "learner"} and asked <= offered
        if argv[2] == "jobs.finetune":  # Ray Train workers on the GPU group, the run on the shared volume
            assert args.address == "auto" and args.num_workers >= 1 and args.use_gpu
            assert {name for name, _ in args.worker_resource} == {"learner"} <= offered
            assert args.out.startswith("/mnt/rec-rllib/")


def test_kuberay_rayservice_embeds_the_gpu_serve_config():
    """The RayService's Serve config passes Serve's schema and is serving/config-gpu.yaml up to paths,
    the HTTP host inside the pod and the `serve` resource that places scorers on the GPU group."""
    doc = _manifest("rayservice.yaml")
    assert doc["kind"] == "RayService"
    groups = _group_resources(doc["spec"]["rayClusterConfig"])
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _serve_schema(embedded)
    local = yaml.safe_load((REPO / "serving" / "config-gpu.yaml").read_text())
    app, ref = embedded["applications"][0], local["applications"][0]
    assert app["import_path"] == ref["import_path"] and set(app["args"]) == set(ref["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    for d in ref["deployments"]:
        mine = dict(deployments[d["name"]])
        options = dict(mine.pop("ray_actor_options"))
        for resource in options.pop("resources", {}):
            assert any(resource in g for g in groups.values()), resource
        assert options == d["ray_actor_options"]
        assert {k: v for k, v in mine.items()} == {k: v for k, v in d.items() if k != "ray_actor_options"}
