"""Cluster configs: launcher YAMLs validate against the schema the installed Ray ships; KubeRay
manifests have the structure the operator needs; nothing exposes the dashboard or GCS unauthenticated."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "cluster_configs"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def validated(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults.yaml, like `ray up`
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json + cross-field checks
    return cfg


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_against_rays_schema(name):
    cfg = validated(load(name))
    types = cfg["available_node_types"]
    gpu_types = {t: v for t, v in types.items() if v["resources"].get("GPU", 0) > 0}
    # A 1-GPU type for feature actors and a multi-GPU type for training, both scaling from zero.
    assert sorted(v["resources"]["GPU"] for v in gpu_types.values()) == [1, 8]
    assert all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in gpu_types.values())
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.55.0")
    assert any("saerl-ray" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_dashboard_on_loopback_with_token_auth(name):
    cfg = validated(load(name))
    head = " ".join(cfg["head_start_ray_commands"])
    # Ray's defaults.yaml starts the head with --dashboard-host=0.0.0.0: ours must override it.
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd


def test_schema_rejects_a_broken_launcher_config():
    raw = load("aws.yaml")
    raw["available_node_types"]["gpu_feature"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validated(raw)
    raw = load("aws.yaml")
    raw["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validated(raw)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_structure(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == "2.55.0" and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"].endswith("2.55.0-py311")
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in containers(g)[0]["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for g in gpu_groups:
        res = containers(g)[0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert containers(g)[0]["image"].endswith("-gpu")
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python jobs/pipeline.py")
        assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_dashboard_not_exposed_and_authenticated(name):
    spec = cluster_spec(load(name))
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    binds_all = head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    # Binding inside the pod is only allowed behind KubeRay token auth.
    assert not binds_all or spec.get("authOptions", {}).get("mode") == "token"


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_no_public_bind_without_auth_anywhere(name):
    text = (CONFIGS / name).read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    if "0.0.0.0" in code:
        assert "mode: token" in code, f"{name} binds 0.0.0.0 without token auth"
    assert "LoadBalancer" not in code and "NodePort" not in code
