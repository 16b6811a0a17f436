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
    assert "env_runner" in types["cpu_worker"]["resources"]
    assert {"learner", "serve"} <= set(types["gpu_worker"]["resources"])


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["env_vars"]["REC_RLLIB_DATA"]
