"""Cluster configs: the launcher YAMLs validate against the schema the installed Ray ships and the KubeRay
manifests against KubeRay's CRD (unknown fields are errors); nothing exposes the dashboard or the GCS
unauthenticated; every config runs the one image (docker/Dockerfile), which installs torch, then
flash-attn without build isolation, then the GPU extra, then the project, all read from pyproject.toml;
no config or runtime_env installs or lists a package itself; run dirs go to durable storage; CPU work
has CPU nodes to go to; the RayJob's entrypoint is a file of the image. Plus docker/deps.py, the
dependency check `make test` runs, on local stand-in packages (its registry run is `make deps-check`)."""

from __future__ import annotations

import ast
import copy
import fnmatch
import gzip
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from saerl_ray.core.device import min_driver

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
RUNTIME_ENVS = ["jobs/runtime_env_core.yaml", "jobs/runtime_env_gpu.yaml"]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# KubeRay v1.7.0's RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml at tag v1.7.0, commit
# 59d663ae), openAPIV3Schema of v1 with `description`s stripped, gzipped JSON. Its spec.rayClusterSpec is
# the RayCluster CRD's spec schema verbatim (checked when it was extracted).
CRD = CONFIGS / "kuberay" / "crd" / "ray.io_rayjobs.v1.7.0.schema.json.gz"
# Build tools the flash-attn builder stage installs because --no-build-isolation skips its build env;
# they are not runtime dependencies and none reaches the final image except as the wheel they build.
FLASH_ATTN_BUILD_TOOLS = {"packaging", "psutil", "setuptools", "wheel", "ninja"}


def _load_deps():
    spec = importlib.util.spec_from_file_location("saerl_docker_deps", ROOT / "docker" / "deps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


deps = _load_deps()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def validated(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults.yaml, like `ray up`
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json + cross-field checks
    return cfg


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def is_gpu_group(group: dict) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(group))


def strings(node) -> list[str]:
    """Every string value in a parsed YAML document (commands, args, runtimeEnvYAML...)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


# ---------------------------------------------------------------- the Dockerfile, as instructions


def dockerfile_stages(text: str = None) -> list[dict]:
    """[{name, base, instructions: [(KEYWORD, args)]}] with continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued RUN
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        logical.append(buf.strip())
        buf = ""
    args, stages = {}, []
    for inst in logical:
        kw, _, rest = inst.partition(" ")
        kw = kw.upper()
        if kw == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
        elif kw == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            stages.append({"name": m.group(2), "base": base, "instructions": []})
        else:
            stages[-1]["instructions"].append((kw, rest))
    return stages


def runs(stage: dict) -> list[str]:
    return [a for k, a in stage["instructions"] if k == "RUN"]


def install_steps(commands: list[str]) -> list[tuple[str, str]]:
    """(what, command) for each package-installing command, in order: torch, flash-attn (from source
    without build isolation: 'flash-attn-nbi'; from a built wheel: 'flash-attn-wheel'; any other way:
    'flash-attn'), gpu (openrlhf / vllm / deepspeed or the gpu extra), project, other."""
    out = []
    for cmd in commands:
        for part in re.split(r"&&|;|\n", cmd):
            if not re.search(r"\b(pip3?|uv pip)\s+(install|wheel)\b", part):
                continue
            if re.search(r"pin torch\b|\btorch==", part):
                out.append(("torch", part))
            elif re.search(r"flash[-_]attn", part):
                if re.search(r"\.whl\b", part):
                    out.append(("flash-attn-wheel", part))
                elif "--no-build-isolation" in part:
                    out.append(("flash-attn-nbi", part))
                else:
                    out.append(("flash-attn", part))
            elif re.search(r"openrlhf|vllm|deepspeed|--extra gpu|\[gpu\]|-r /tmp/requirements", part):
                out.append(("gpu", part))
            elif re.search(r"(-e\s+|\s)(\.|~/saerl-ray|/home/ray/saerl-ray)(\s|$)", part + " "):
                out.append(("project", part))
            else:
                out.append(("other", part))
    return out


def order_problems(steps: list[tuple[str, str]]) -> list[str]:
    """What is wrong with an install sequence: torch first, flash-attn built without isolation after it
    (or installed as that build's wheel), the gpu extra after flash-attn, the project last."""
    kinds = [k for k, _ in steps]
    problems = []

    def first(*ks):
        return min((i for i, k in enumerate(kinds) if k in ks), default=None)

    fa, gpu, torch_ = first("flash-attn-nbi", "flash-attn-wheel"), first("gpu"), first("torch")
    if "flash-attn" in kinds:
        problems.append("flash-attn is built with build isolation (its setup.py imports torch, which that env lacks)")
    if gpu is not None and (fa is None or fa > gpu):
        problems.append("the gpu extra (openrlhf pins flash-attn) is installed before flash-attn")
    if fa is not None and (torch_ is None or torch_ > fa):
        problems.append("flash-attn is installed before torch")
    last_dep = max((i for i, k in enumerate(kinds) if k != "project"), default=-1)
    if "project" in kinds and kinds.index("project") < last_dep:
        problems.append("the project is installed before its dependencies")
    return problems


def test_order_check_catches_the_old_launcher_sequence():
    # aws.yaml's gpu_train worker_setup_commands before this image existed: openrlhf (which pins
    # flash-attn==2.8.3) came before the --no-build-isolation step, so pip built flash-attn in isolation.
    old = ["pip install -q -e ~/saerl-ray", "pip install -q openrlhf==0.11.2 deepspeed==0.19.6 vllm==0.29.0",
           "pip install -q --no-build-isolation flash-attn==2.8.3"]
    assert order_problems(install_steps(old))
    good = ["pip install torch==2.13.0", "pip install --no-build-isolation flash-attn==2.8.3",
            "pip install openrlhf==0.11.2", "pip install -e ."]
    assert order_problems(install_steps(good)) == []


def test_dockerfile_installs_in_the_one_working_order():
    stages = dockerfile_stages()
    builder, final = stages[0], stages[-1]
    # Builder: torch, then flash-attn from source without build isolation.
    # Builder: torch, then flash-attn from source without build isolation, then DeepSpeed's wheel (its
    # ops prebuilt against that torch; tests/test_image_on_cpu.py checks the compiles themselves).
    b = install_steps(runs(builder))
    assert [k for k, _ in b if k != "other"] == ["torch", "flash-attn-nbi", "gpu"], b
    assert "pin deepspeed" in [r for r in runs(builder) if "pip wheel" in r][-1]
    assert order_problems(b) == []
    # Final image: torch, the builder's flash-attn wheel, the gpu extra, the project.
    f = install_steps(runs(final))
    assert [k for k, _ in f] == ["torch", "flash-attn-wheel", "gpu", "project"], f
    assert order_problems(f) == []
    copied = [a for k, a in final["instructions"] if k == "COPY" and f"--from={builder['name']}" in a]
    assert copied, "the final stage must take flash-attn from the builder stage"
    # The gpu set is what gets installed: the requirements file is pyproject's core + gpu.
    assert any("deps.py requirements --set gpu" in r for r in runs(final))


def test_dockerfile_reads_versions_from_pyproject_only():
    stages = dockerfile_stages()
    code = "\n".join(a for s in stages for k, a in s["instructions"] if k in ("RUN", "ENV", "ARG"))
    # NVIDIA_REQUIRE_CUDA is the driver torch's CUDA needs, not a package (test_image_on_cpu.py ties it
    # to DOCUMENTED_TORCH_CUDA, and each image's build checks it against the installed torch).
    code = re.sub(r'NVIDIA_REQUIRE_CUDA="[^"]*"', "", code)
    assert not re.search(r"[A-Za-z0-9_.\-\]]\s*(==|>=|<=|~=)\s*\d", code), "a version typed in the Dockerfile"
    # Every package-installing command names its packages through docker/deps.py, a built wheel, the
    # project itself, or (builder only) flash-attn's build tools.
    for i, s in enumerate(stages):
        for run in runs(s):
            for kind, cmd in install_steps([run]):
                if kind == "other":
                    assert i == 0, f"an image stage installs something outside pyproject: {cmd}"
                    pkgs = {w for w in cmd.split() if not w.startswith("-") and w not in ("pip", "install")}
                    assert pkgs <= FLASH_ATTN_BUILD_TOOLS, cmd
                elif kind == "torch":
                    assert "docker/deps.py pin" in cmd, cmd
                elif kind == "flash-attn-nbi" or (i == 0 and kind == "gpu"):
                    # Built from the sdist the same RUN downloaded at pyproject's pin.
                    assert re.search(r"pip download .*docker/deps\.py pin", run) or "docker/deps.py pin" in cmd, run
    # Base image: Ray at pyproject's pin, for pyproject's Python.
    ray_version = deps.exact_pins([deps.pin("ray")])["ray"]
    py = re.search(r">=\s*3\.(\d+)", PYPROJECT["requires-python"]).group(1)
    for s in stages:
        assert s["base"].startswith(f"rayproject/ray:{ray_version}-py3{py}-"), s["base"]


def dockerignored(rel: str) -> bool:
    ignore = ROOT / "docker" / "Dockerfile.dockerignore"
    pats = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(pre, p.rstrip("/")) for p in pats for pre in prefixes)


def image_home() -> Path:
    """Where the final stage copies the build context (`COPY . .` under WORKDIR)."""
    final = dockerfile_stages()[-1]
    workdir = [a for k, a in final["instructions"] if k == "WORKDIR"][-1]
    assert any(k == "COPY" and a.split()[-2:] == [".", "."] for k, a in final["instructions"])
    return Path(workdir)


def test_rayjob_entrypoint_is_in_the_image_and_parses():
    from saerl_ray.cli import build_parser, overrides
    from saerl_ray.core.config import load_config

    doc = load("kuberay/rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python"
    home = image_home()

    def in_image(path: str) -> Path:
        rel = Path(path).relative_to(home).as_posix()  # an absolute path under the image's project copy
        assert (ROOT / rel).is_file() and not dockerignored(rel), f"{path} is not in the image"
        return ROOT / rel

    in_image(argv[1])
    assert argv[1].endswith("jobs/pipeline.py")
    rest = argv[2:]
    config = rest[rest.index("--config") + 1]
    rest[rest.index("--config") + 1] = str(in_image(config))
    # The same parse jobs/pipeline.py does: every flag must be a config field, and the config valid.
    cfg = load_config(*(lambda ns: (ns.config, overrides(ns)))(build_parser().parse_args(["run", *rest])))
    assert cfg.run_dir.startswith("s3://"), "a RayJob's cluster is deleted with it: run_dir must be in a bucket"
    assert cfg.ingest.inputs and all(i.path.startswith("s3://") for i in cfg.ingest.inputs)
    # Feature actors ask for the GPUs the cluster's GPU group offers.
    assert cfg.features.num_gpus_per_actor >= 1
    for rel in ["pyproject.toml", "docker/deps.py", "saerl_ray/cli.py"]:
        assert not dockerignored(rel)


# ---------------------------------------------------------------- one image, no package lists elsewhere


def launcher_images(cfg: dict) -> list[str]:
    d = cfg.get("docker", {})
    out = [d[k] for k in ("image", "head_image", "worker_image") if d.get(k)]
    for t in cfg["available_node_types"].values():
        td = t.get("docker", {})
        out += [td[k] for k in ("image", "head_image", "worker_image") if td.get(k)]
    return out


def pod_images(doc: dict) -> list[str]:
    out = [c["image"] for g in groups(cluster_spec(doc)) for c in containers(g)]
    sub = doc.get("spec", {}).get("submitterPodTemplate")
    if sub:
        out += [c["image"] for c in sub["spec"]["containers"]]
    return out


def test_every_cluster_config_runs_the_one_image():
    images = {n: launcher_images(load(n)) for n in LAUNCHER} | {n: pod_images(load(n)) for n in KUBERAY}
    assert all(images.values()), f"a config without an image: {images}"
    distinct = {i for v in images.values() for i in v}
    assert len(distinct) == 1, f"configs run different images: {images}"
    (image,) = distinct
    assert not image.startswith("rayproject/"), "a stock Ray image has neither the project nor its GPU stack"
    # The tag says what is in it, read from pyproject and deps.py: bump them and this asks for a new tag.
    ray_version = deps.exact_pins([deps.pin("ray")])["ray"]
    cuda = deps.DOCUMENTED_TORCH_CUDA.replace(".", "")
    assert image.split(":")[-1] == f"{PYPROJECT['version']}-ray{ray_version}-cu{cuda}"
    assert image.split(":")[0].endswith("/saerl-ray")
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command should tag this image"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_nodes_install_nothing(name):
    cfg = validated(load(name))  # with Ray's defaults merged: their `pip install boto3` counts too
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"]
    cmds = [c for k in keys for c in cfg.get(k, [])]
    cmds += [c for t in cfg["available_node_types"].values() for k in keys for c in t.get(k, [])]
    assert install_steps(cmds) == [], f"{name} installs packages at boot: {cmds}"
    assert not any(str(v).rstrip("/") in (".", "./") for v in cfg.get("file_mounts", {}).values()), \
        "the project comes with the image (and jobs upload their working dir), not a rsync of the repo"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pods_install_nothing(name):
    doc = load(name)
    assert install_steps(strings(doc)) == []
    if doc["kind"] == "RayJob":
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert set(env) <= {"env_vars", "working_dir"}, env
        assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in env["env_vars"]


@pytest.mark.parametrize("path", RUNTIME_ENVS)
def test_runtime_envs_carry_only_working_dir_and_env_vars(path):
    env = yaml.safe_load((ROOT / path).read_text())
    assert set(env) <= {"working_dir", "env_vars", "excludes"}, f"{path} installs or configures: {set(env)}"
    # The override would drop the job's working_dir for its workers and let Ray delete it under the driver.
    assert env["working_dir"] == "." and "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in env["env_vars"]


@pytest.mark.parametrize("path", [*(f"cluster_configs/{n}" for n in LAUNCHER + KUBERAY), *RUNTIME_ENVS])
def test_no_config_lists_a_package(path):
    text = (ROOT / path).read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    names = {deps._name(r) for r in deps.requirements(["gpu", "dev"])} | {"ray", "saerl-ray"}
    pinned = re.findall(r"\b([A-Za-z][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?\s*(?:==|>=|<=|~=)\s*\d", code)
    assert pinned == [], f"{path} pins packages itself: {pinned} (pyproject.toml is the one list)"
    listed = [w for w in re.findall(r"^\s*-\s*([A-Za-z][A-Za-z0-9_.\-]*)\s*$", code, re.M) if deps._norm(w) in names]
    assert listed == [], f"{path} lists packages: {listed}"


# ---------------------------------------------------------------- launcher configs


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_against_rays_schema(name):
    cfg = validated(load(name))
    types = cfg["available_node_types"]
    gpu_types = {t: v for t, v in types.items() if v["resources"].get("GPU", 0) > 0}
    # A 1-GPU type for feature actors and a multi-GPU type for training, both scaling from zero.
    assert sorted(v["resources"]["GPU"] for v in gpu_types.values()) == [1, 8]
    assert all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in gpu_types.values())
    head = types[cfg["head_node_type"]]["resources"]
    # Drivers (entrypoint_num_cpus=1) fit on the head, and CPU stages have CPU workers to scale onto.
    assert head.get("GPU", 0) == 0 and head.get("CPU", 0) >= 1
    cpu_types = [v for t, v in types.items() if t != cfg["head_node_type"] and not v["resources"].get("GPU")]
    assert cpu_types and all(v["max_workers"] > 0 and v["resources"]["CPU"] > 0 for v in cpu_types)


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


def ray_default_ami(region: str) -> str:
    """What Ray's AWS provider launches when a node type has no ImageId (read from its source)."""
    src = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "_private" / "aws" / "config.py"
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_AMI" for t in node.targets):
            return ast.literal_eval(node.value)[region]
    raise AssertionError("DEFAULT_AMI not found in Ray's AWS provider")


def test_aws_nodes_pin_one_ami_and_reach_the_bucket():
    cfg = validated(load("aws.yaml"))
    region = cfg["provider"]["region"]
    nodes = {t: v["node_config"] for t, v in cfg["available_node_types"].items()}
    amis = {n.get("ImageId") for n in nodes.values()}
    # Without ImageId Ray 2.55 launches its Ubuntu 18.04 DLAMI, whose driver cannot run CUDA 13.
    assert len(amis) == 1 and None not in amis, f"every node type pins the same AMI: {amis}"
    (ami,) = amis
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", ami) and ami != ray_default_ami(region)
    # Every node (workers write blocks and checkpoints) gets the same instance profile for S3.
    profiles = {json.dumps(n.get("IamInstanceProfile"), sort_keys=True) for n in nodes.values()}
    assert len(profiles) == 1 and "null" not in profiles, profiles
    assert f"--env AWS_REGION={region}" in cfg["docker"]["run_options"]


def test_gcp_nodes_pin_one_driver_580_image_and_reach_the_bucket():
    cfg = validated(load("gcp.yaml"))
    nodes = {t: v["node_config"] for t, v in cfg["available_node_types"].items()}
    images = {d["initializeParams"]["sourceImage"] for n in nodes.values() for d in n["disks"] if d.get("boot")}
    assert len(images) == 1, images
    (image,) = images
    assert "/family/" not in image, "an image family floats to whatever is newest: pin an image"
    driver = int(re.search(r"nvidia-(\d{3})", image).group(1))
    cuda = deps.DOCUMENTED_TORCH_CUDA
    assert driver >= int(min_driver(cuda).split(".")[0]), f"driver {driver} cannot run CUDA {cuda}"
    # Ray gives the head its service account; workers need one with storage rights to write blocks.
    for t, n in nodes.items():
        if t != cfg["head_node_type"]:
            scopes = [s for a in n.get("serviceAccounts", []) for s in a["scopes"]]
            assert "https://www.googleapis.com/auth/cloud-platform" in scopes, f"{t} cannot write to GCS"


# ---------------------------------------------------------------- KubeRay


def crd_schema(strict: bool = True) -> dict:
    """The RayJob CRD schema; strict: objects with declared properties reject undeclared ones (as
    `kubectl apply --validate=strict` does; the API server would otherwise drop them silently)."""
    schema = json.loads(gzip.decompress(CRD.read_bytes()))

    def tighten(s):
        if isinstance(s, dict):
            if (strict and s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
                    and not s.get("x-kubernetes-preserve-unknown-fields")):
                s["additionalProperties"] = False
            for v in s.values():
                tighten(v)
        elif isinstance(s, list):
            for v in s:
                tighten(v)

    tighten(schema)
    return schema


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schema()
    if doc["kind"] == "RayCluster":  # the RayCluster CRD's spec is the RayJob's rayClusterSpec
        schema = {"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": schema["properties"]["spec"]["properties"]["rayClusterSpec"]}, "additionalProperties": False}
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_validates_against_the_crd(name):
    assert crd_errors(load(name)) == []


def test_crd_check_rejects_a_misspelt_field():
    doc = load("kuberay/raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = doc["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert any("maxReplica" in e for e in crd_errors(doc))
    doc = load("kuberay/rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    errors = crd_errors(doc)
    assert any("shutdownAfterJobFinishes" in e for e in errors) and any("authOptions/mode" in e for e in errors)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_structure(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == deps.exact_pins([deps.pin("ray")])["ray"] and spec["enableInTreeAutoscaling"] is True
    assert [g for g in spec["workerGroupSpecs"] if is_gpu_group(g)], "no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for g in filter(is_gpu_group, spec["workerGroupSpecs"]):
        res = containers(g)[0]["resources"]
        gpus = res["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and gpus == res["requests"]["nvidia.com/gpu"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_cpu_work_never_needs_a_gpu_pod(name):
    spec = cluster_spec(load(name))
    # A driver (entrypoint_num_cpus=1) fits on the head...
    assert float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", "1")) >= 1
    # ...and CPU stages scale onto CPU pods, not onto the GPU groups.
    cpu = [g for g in spec["workerGroupSpecs"] if not is_gpu_group(g)]
    assert cpu and all(g["maxReplicas"] > 0 and containers(g)[0]["resources"]["limits"]["cpu"] for g in cpu)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pods_reach_the_run_dir_bucket(name):
    # Pods are ephemeral (a RayJob deletes its cluster): run dirs live in the bucket, and every pod,
    # workers included (they write blocks and checkpoints), gets its AWS_* credentials from one secret.
    secrets = set()
    for g in groups(cluster_spec(load(name))):
        for c in containers(g):
            refs = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            assert refs, f"{g.get('groupName', 'head')}/{c['name']} has no bucket credentials"
            secrets |= refs
    assert len(secrets) == 1, secrets


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
    assert "LoadBalancer" not in code and "NodePort" not in code and "enableIngress: true" not in code


# ---------------------------------------------------------------- GPU placement and pod sizes

# (vCPU, GiB, GPUs) of the instance types aws.yaml names (AWS's instance-type pages).
INSTANCES = {"m5.2xlarge": (8, 32, 0), "m5.4xlarge": (16, 64, 0), "g5.xlarge": (4, 16, 1), "p4d.24xlarge": (96, 1152, 8)}
# What a pod may request of its node: EKS's kubelet reserve (memory 255 MiB + 11 MiB per allowed pod, CPU
# 60-110 millicores), the eviction threshold, the aws-node / kube-proxy daemonsets and the OS need the rest.
SPARE_CPUS, MEMORY_SHARE = 1, 0.8
TRAIN_RESOURCE = "saerl_train_gpu"
INSTANCE_ANNOTATION = "saerl-ray/instance-type"


def quantity(q: str) -> float:
    """A Kubernetes CPU or memory quantity as cores or GiB."""
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


def group_name(group: dict) -> str:
    return group.get("groupName", "head")


def autoscaler_view(doc: dict) -> dict[str, dict]:
    """Each group's Ray resources as the KubeRay autoscaler derives them (Ray's own parser)."""
    from ray.autoscaler._private.kuberay import autoscaling_config

    cr = {"metadata": {"name": "saerl", "namespace": "default"}, "spec": cluster_spec(doc)}
    types = autoscaling_config._derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    return {t: v["resources"] for t, v in types.items()}


def rayjob_config():
    """The RayJob entrypoint's run config, parsed as jobs/pipeline.py parses it."""
    from saerl_ray.cli import build_parser, overrides
    from saerl_ray.core.config import load_config

    argv = shlex.split(load("kuberay/rayjob.yaml")["spec"]["entrypoint"])[2:]
    rel = Path(argv[argv.index("--config") + 1]).relative_to(image_home())
    argv[argv.index("--config") + 1] = str(ROOT / rel)
    ns = build_parser().parse_args(["run", *argv])
    return load_config(ns.config, overrides(ns))


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pod_requests_fit_the_aws_instance_types(name):
    aws_types = {t["node_config"]["InstanceType"] for t in load("aws.yaml")["available_node_types"].values()}
    assert set(INSTANCES) == aws_types, "the size table must cover exactly the instance types aws.yaml names"
    for g in groups(cluster_spec(load(name))):
        itype = g["template"].get("metadata", {}).get("annotations", {}).get(INSTANCE_ANNOTATION)
        assert itype in INSTANCES, f"{name} {group_name(g)}: annotate the aws.yaml instance type it is sized for"
        vcpu, gib, gpus = INSTANCES[itype]
        for c in containers(g):
            req = c["resources"]["requests"]
            assert quantity(req["cpu"]) <= vcpu - SPARE_CPUS, f"{name} {group_name(g)}: {req['cpu']} CPU on a {itype}"
            assert quantity(req["memory"]) <= MEMORY_SHARE * gib, f"{name} {group_name(g)}: {req['memory']} on a {itype}"
            assert int(req.get("nvidia.com/gpu", 0)) <= gpus, f"{name} {group_name(g)}: more GPUs than a {itype} has"
        assert is_gpu_group(g) == (gpus > 0), f"{name} {group_name(g)}: a {itype} pod should use its GPUs"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_omp_threads_follow_each_pods_cpu_limit(name):
    for g in groups(cluster_spec(load(name))):
        for c in containers(g):
            env = {e["name"]: e for e in c.get("env", [])}
            assert "OMP_NUM_THREADS" in env, f"{name} {group_name(g)}/{c['name']}: OMP_NUM_THREADS unset"
            e = env["OMP_NUM_THREADS"]
            if "value" in e:
                assert quantity(e["value"]) == quantity(c["resources"]["limits"]["cpu"])
            else:
                ref = e["valueFrom"]["resourceFieldRef"]
                assert ref["resource"] == "limits.cpu" and ref.get("containerName", c["name"]) == c["name"]
                assert quantity(ref.get("divisor", "1")) == 1


def test_rayjob_sae_stage_gets_a_gpu():
    doc = load("kuberay/rayjob.yaml")
    cfg = rayjob_config()
    entry_gpus = doc["spec"].get("entrypointNumGpus", 0)
    assert cfg.sae.source == "train" and (cfg.sae.num_gpus >= 1 or entry_gpus >= 1), \
        "the SAE stage would train on the head's CPUs"
    # ...and some GPU group can hold the task (or the driver) that asks for them.
    most = max(v.get("GPU", 0) for v in autoscaler_view(doc).values())
    assert max(cfg.sae.num_gpus, entry_gpus) <= most


@pytest.mark.parametrize("name", LAUNCHER)
def test_only_training_node_types_advertise_the_train_resource(name):
    types = validated(load(name))["available_node_types"]
    train = {t: v["resources"] for t, v in types.items() if v["resources"].get("GPU", 0) >= 8}
    assert train, f"{name}: no training node type"
    for t, v in types.items():
        res = v["resources"]
        expected = res["GPU"] if t in train else None
        assert res.get(TRAIN_RESOURCE) == expected, f"{name} {t}: {TRAIN_RESOURCE}={res.get(TRAIN_RESOURCE)}"


def test_only_the_kuberay_training_group_advertises_the_train_resource():
    # raycluster.yaml is where training jobs run (the RayJob runs the data pipeline only).
    view = autoscaler_view(load("kuberay/raycluster.yaml"))
    for group, res in view.items():
        expected = res["GPU"] if res.get("GPU", 0) >= 8 else None
        assert res.get(TRAIN_RESOURCE) == expected, f"{group}: {TRAIN_RESOURCE}={res.get(TRAIN_RESOURCE)}"


def verl_image() -> str:
    (image,) = set(launcher_images(load("aws.yaml")))
    return image.replace("/saerl-ray:", "/saerl-ray-verl:")


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_every_cluster_config_names_the_verl_image(name):
    text = (CONFIGS / name).read_text()
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    assert verl_image() in comments, f"{name} does not say which image verl training needs"
    if name in LAUNCHER:  # a commented alternative for docker.image, ready to swap in
        assert re.search(rf"^  # image: {re.escape(verl_image())}$", text, re.MULTILINE), name


def test_raycluster_sed_recipe_gives_a_valid_all_verl_cluster():
    text = (CONFIGS / "kuberay/raycluster.yaml").read_text()
    (cmd,) = re.findall(r"#\s+(sed '[^']+' cluster_configs/kuberay/raycluster\.yaml)", text)
    pattern, replacement = re.fullmatch(r"sed 's#([^#]+)#([^#]+)#' \S+", cmd).groups()
    doc = yaml.safe_load(text.replace(pattern, replacement))
    assert set(pod_images(doc)) == {verl_image()} and crd_errors(doc) == []


# ---------------------------------------------------------------- docker/deps.py (the dependency check)


def test_deps_reads_the_pins_from_pyproject():
    assert deps.pin("torch") in PYPROJECT["dependencies"]
    gpu = deps.exact_pins(PYPROJECT["optional-dependencies"]["gpu"])
    assert set(gpu) == {"openrlhf", "deepspeed", "vllm", "flash-attn"}
    assert deps.requirements(["gpu"]) == PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["gpu"]
    assert "torch==" not in " ".join(deps.requirements(["gpu"], exclude=["torch"]))
    with pytest.raises(KeyError):
        deps.pin("not-a-dependency")


def test_torch_cuda_is_read_from_wheel_metadata():
    # torch 2.13.0's requires_dist on PyPI (pip's report, 2026-12-01).
    cu13 = ['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"', "nvidia-cudnn-cu13==9.20.0.48"]
    assert deps.torch_cuda(cu13) == "13.0"
    assert deps.torch_cuda(["nvidia-cublas-cu12==12.8.4.1; platform_system == 'Linux'"]) == "12"
    assert deps.torch_cuda(["filelock", "sympy>=1.13.3"]) is None  # the CPU wheel


def test_resolver_check_fails_a_broken_pin_offline(tmp_path):
    # A local index of stand-in packages: the same pip invocation `make deps-check` runs on the registry.
    index, links = tmp_path / "index", tmp_path / "links"
    index.mkdir()
    links.mkdir()
    deps._stub_wheel(links, "stub-trainer", "1.0", ["stub-attn==2.0"])
    deps._stub_wheel(links, "stub-attn", "1.0", [])
    rc, report, err = deps.resolve(["stub-trainer==1.0"], index.as_uri(), [links], timeout=5)
    assert rc != 0 and "stub-attn" in err, err
    deps._stub_wheel(links, "stub-attn", "2.0", [])
    rc, report, err = deps.resolve(["stub-trainer==1.0"], index.as_uri(), [links], timeout=5)
    assert rc == 0, err
    assert {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]} == {
        "stub-trainer": "1.0", "stub-attn": "2.0"}


def test_dependency_check_skips_only_when_the_registry_is_unreachable(monkeypatch, capsys):
    # Port 9 on loopback refuses the connection: no registry at all, the one case the check may skip.
    monkeypatch.delenv("SAERL_REQUIRE_REGISTRY", raising=False)
    assert deps.check("http://127.0.0.1:9/simple") == 0
    assert "SKIPPED" in capsys.readouterr().out
    monkeypatch.setenv("SAERL_REQUIRE_REGISTRY", "1")
    assert deps.check("http://127.0.0.1:9/simple") == 1
