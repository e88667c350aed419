"""A real multi-node Ray cluster on this machine (a head and two worker raylets, `ray start`
processes with their own resources, token auth on), the pipeline submitted through
`jobs/submit_pipeline.sh` with `run_dir` on a real S3 server, and node faults.

Every job result is compared with a single-node, in-process run of the same config: same ids, same
clusters (same seed and k-means task count), feature codes equal within 1e-5 (fp32 on CPU both ways).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from testkit import free_port

from saerl_ray.core import storage

pytestmark = pytest.mark.slow  # minutes: run by `make test-slow` and CI's .ci/run

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
TOKEN = secrets.token_hex(16)


class Cluster:
    """Head + workers as separate `ray start --block` process groups sharing one temp dir."""

    def __init__(self, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/rmn")  # unix socket paths must stay short
        self.env = env
        self.gcs, self.dash = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str], hide: str | None = None) -> None:
        """`ray start --block` for one node; `hide`: a folder this node sees as an empty tmpfs (its own
        private mount namespace), as a second machine would not see the first one's local files."""
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--min-worker-port", "0", "--max-worker-port", "0"]
        log = open(Path(self.temp_dir) / f"start-{name}.log", "ab")
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', hide] if hide else []
        self.procs[name] = subprocess.Popen(
            [*wrap, str(RAY), "start", "--block", "--disable-usage-stats", *args, *ports],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs), "--num-cpus", "1", "--resources", '{"head": 1}',
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dash), "--temp-dir", self.temp_dir,
                             "--ray-client-server-port", str(free_port())])

    def add_worker(self, name: str, resources: dict[str, float] | None = None, hide: str | None = None) -> None:
        self._start(name, ["--address", f"127.0.0.1:{self.gcs}", "--num-cpus", "1",
                           "--resources", json.dumps({name: 1, **(resources or {})})], hide=hide)

    def node_ids(self) -> dict[str, str]:
        """worker name -> alive node id (by its custom resource)."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=f"http://127.0.0.1:{self.dash}", detail=True):
            if n.state == "ALIVE":
                for name in self.procs:
                    if (n.resources_total or {}).get(name):
                        out[name] = n.node_id
        return out

    def wait_up(self, probe, what: str, timeout: float = 300):
        """probe() until it returns a value; fail with the nodes' own logs if a process exits first."""
        deadline = time.time() + timeout  # the dashboard takes a minute or more on a busy 2-core box
        while True:
            try:
                value = probe()
                if value:
                    return value
            except Exception:
                pass
            dead = {k: p.poll() for k, p in self.procs.items() if p.poll() is not None}
            if dead or time.time() > deadline:
                logs = Path(self.temp_dir) / "session_latest" / "logs"
                tail = "".join(f.read_text()[-800:] for f in sorted(logs.glob("dashboard*.err"))) if logs.exists() else ""
                tail += "".join(f"\n--- {f.name}\n" + f.read_text()[-2500:] for f in sorted(Path(self.temp_dir).glob("start-*.log")))
                gcs = logs / "gcs_server.out"
                tail += "\n--- gcs_server.out\n" + (gcs.read_text()[-1500:] if gcs.exists() else "none")
                pytest.fail(f"cluster: {what} not up (exited: {dead}): {tail}")
            time.sleep(1)

    def restart_worker(self, name: str, tries: int = 3) -> None:
        """Start a worker and wait until it is alive; a raylet that misses its start-up deadline on a
        loaded box is started again."""
        for attempt in range(tries):
            self.add_worker(name, {"gpu_node": 1} if name == "w2" else None)
            try:
                self.wait_up(lambda: name in self.node_ids() or None, f"worker {name}")
                return
            except pytest.fail.Exception:
                if attempt == tries - 1:
                    raise
                self.procs.pop(name, None)

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group: raylet, its workers, everything it started."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                try:
                    p.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server):
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "CI": "1",
           # A busy 2-core box can take longer than Ray's 30 s for the dashboard's modules to start.
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180", "RAY_raylet_start_wait_time_s": "120",
           # Ray Data starts a pool's actors without waiting for them: an actor whose node still unpacks the
           # job's working dir can miss every one of these tiny blocks, so which nodes compute them would be a
           # race. Jobs on this cluster wait for the whole pool before the first block.
           "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
           # A job's `python ...` entrypoint is the nodes' python, as in the cluster image.
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # for this process's Job API client
    c = Cluster(env)
    try:
        for attempt in range(3):  # a head on a loaded 2-core box sometimes misses its own GCS's 5 s deadline
            c.start_head()
            try:
                c.client = c.wait_up(lambda: _client(c), "the head's Job API")
                break
            except pytest.fail.Exception:
                if attempt == 2:
                    raise
                c.stop()
                c = Cluster(env)
        # Workers join only a head that is up: an early `ray start --address` gives up on an empty GCS.
        c.restart_worker("w1")
        c.restart_worker("w2")  # w2 carries {"gpu_node": 1}: it stands for a GPU node
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()
    os.environ["RAY_AUTH_MODE"] = "disabled"


def _client(c: Cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://127.0.0.1:{c.dash}")


def tiny_config(tmp_path: Path, model_dir: Path, shared_data: Path, run_dir: str) -> Path:
    cfg = {
        "run_dir": run_dir,
        "seed": 0,
        "model": {"name": str(model_dir)},
        "ingest": {"inputs": [{"path": str(shared_data / "math500.jsonl"), "preset": "math", "limit": 96}]},
        "sae": {"layer": 1, "expansion": 4, "k": 8, "training_tokens": 20_000},
        "features": {"block_rows": 8, "top_k": 32, "num_actors": 2, "num_cpus_per_actor": 0.25},
        "signals": {"cluster": {"k": 3, "num_tasks": 2}, "difficulty": {"n_labelled": None},
                    "quality": {"n_train": 40}},
        "plan": {"batch_size": 8},
        "eval": {"data_dir": str(shared_data)},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit_script(cluster, config: Path, *flags: str, submission_id: str) -> None:
    """jobs/submit_pipeline.sh exactly as the README says, against the token-auth head."""
    env = {**os.environ, **cluster.env, "RAY_ADDRESS": f"http://127.0.0.1:{cluster.dash}",
           "SAERL_PYTHON": sys.executable, "SAERL_SUBMISSION_ID": submission_id,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "jobs/submit_pipeline.sh", str(config), *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def wait_job(client, job_id: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


def parts_in(run_dir: str) -> list[str]:
    return [f for f in storage.list_dir(storage.join(run_dir, "features")) if f.startswith("part-")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, shared_data):
    """The same config run by `saerl-ray run` on a private single-node cluster, local run_dir. A
    subprocess: this test process must not hold a Ray session with other auth settings than the
    token-auth cluster it talks to."""
    tmp = tmp_path_factory.mktemp("ref")
    config = tiny_config(tmp, tiny_model_dir, shared_data, str(tmp / "run"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CI": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "saerl_ray.cli", "run", "-c", str(config), "--ray.num_cpus", "2"],
                         env=env, cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return str(tmp / "run")


def assert_same_result(run_dir: str, ref_dir: str) -> None:
    from saerl_ray.core.featureio import load_features

    for stage in ("ingest", "sae", "features", "signals", "plan", "report"):
        assert storage.exists(storage.join(run_dir, stage, "_DONE.json")), stage
    a = storage.read_parquet(storage.join(run_dir, "signals", "assignments.parquet")).to_pandas()
    b = storage.read_parquet(storage.join(ref_dir, "signals", "assignments.parquet")).to_pandas()
    assert a["id"].tolist() == b["id"].tolist()  # same ids, same order, none lost or duplicated
    assert a["cluster"].tolist() == b["cluster"].tolist()
    ids_a, Xa, _ = load_features(run_dir)
    ids_b, Xb, _ = load_features(ref_dir, order=list(ids_a))
    assert len(set(ids_a)) == len(ids_a) == len(ids_b)
    assert abs(Xa - Xb).max() <= 1e-5
    pa_, pb = (storage.read_parquet(storage.join(d, "plan", "plan.parquet")).column("id").to_pylist()
               for d in (run_dir, ref_dir))
    assert pa_ == pb


def test_pipeline_job_on_three_nodes_writes_only_to_the_bucket(reference, cluster, tmp_path, tiny_model_dir,
                                                                shared_data, s3_server):
    run_dir = f"s3://saerl-test/mn-{secrets.token_hex(3)}"
    config = tiny_config(tmp_path, tiny_model_dir, shared_data, "runs/never-used")
    submit_script(cluster, config, "--run_dir", run_dir, submission_id="mn-main")
    status = wait_job(cluster.client, "mn-main")
    assert status == "SUCCEEDED", cluster.client.get_job_logs("mn-main")[-4000:]
    assert_same_result(run_dir, reference)
    # The input outside the working dir was staged beside the run, and the job read it from there.
    staged = [f for f in storage.list_dir(storage.join(run_dir, "_inputs"), recursive=True) if f.endswith("math500.jsonl")]
    assert staged
    summary = storage.read_json(storage.join(run_dir, "features", "summary.json"))
    assert len(set(summary["block_nodes"].values())) >= 2, summary["block_nodes"]
    # Nothing written inside the uploaded working dir (every node's copy of it) nor in the repo.
    copies = list(Path(cluster.temp_dir).rglob("_ray_pkg_*"))
    assert copies and not any((c / "runs").exists() for c in copies)
    assert not (REPO / "runs" / "never-used").exists()


def feature_actors(since: float) -> list[psutil.Process]:
    """The features stage's pool actors started after `since` (not a previous job's, still exiting): every
    node of this cluster runs on this machine, and Ray titles an actor's process after its class."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "create_time"]):
        if (p.info["status"] != psutil.STATUS_ZOMBIE and p.info["create_time"] >= since
                and "(FeatureExtractor)" in " ".join(p.info["cmdline"] or [])):
            found.append(p)
    return found


def submit_and_freeze_mid_features(cluster, tmp_path, model_dir, shared_data, run_dir: str, job: str):
    """Submit the pipeline and SIGSTOP every feature actor as soon as the first block is in the bucket.
    The job then stays mid-features however fast this box is (12 blocks of a tiny model can all land in
    the second a poll and a stop take). Returns the config and the frozen actors."""
    config = tiny_config(tmp_path, model_dir, shared_data, run_dir)
    since = time.time() - 1  # psutil's create_time has a coarser clock
    submit_script(cluster, config, submission_id=job)
    deadline = time.time() + 600
    actors: list[psutil.Process] = []
    while len(actors) < 2:  # features.num_actors; the pool waits for both before its first block
        assert time.time() < deadline, f"features never started: {cluster.client.get_job_logs(job)[-3000:]}"
        actors = feature_actors(since)
        time.sleep(0.1)
    while not parts_in(run_dir):
        assert time.time() < deadline, f"no feature block: {cluster.client.get_job_logs(job)[-3000:]}"
        time.sleep(0.02)
    for p in actors:
        p.suspend()
    assert not storage.exists(storage.join(run_dir, "features", "_DONE.json"))
    return config, actors


def signal_all(actors: list[psutil.Process], action: str) -> None:
    for p in actors:
        try:
            getattr(p, action)()
        except psutil.NoSuchProcess:  # it died with its node
            pass


def test_worker_node_killed_during_features_loses_nothing(reference, cluster, tmp_path, tiny_model_dir, shared_data):
    """Fault (a): a worker node dies mid-features; Ray Data reruns its blocks elsewhere."""
    run_dir = f"s3://saerl-test/mn-kill-{secrets.token_hex(3)}"
    _, actors = submit_and_freeze_mid_features(cluster, tmp_path, tiny_model_dir, shared_data, run_dir, "mn-kill")
    driver_node = cluster.client.get_job_info("mn-kill").driver_node_id
    victim = next(name for name, nid in cluster.node_ids().items() if name.startswith("w") and nid != driver_node)
    cluster.kill(victim)
    signal_all(actors, "resume")
    try:
        status = wait_job(cluster.client, "mn-kill")
        assert status == "SUCCEEDED", cluster.client.get_job_logs("mn-kill")[-4000:]
        assert_same_result(run_dir, reference)
    finally:
        cluster.restart_worker(victim)


def test_driver_killed_mid_features_then_resubmitted_reuses_blocks(reference, cluster, tmp_path, tiny_model_dir,
                                                                   shared_data):
    """Fault (b): the job is stopped (driver killed) during features; a resubmission resumes."""
    run_dir = f"s3://saerl-test/mn-resume-{secrets.token_hex(3)}"
    config, actors = submit_and_freeze_mid_features(cluster, tmp_path, tiny_model_dir, shared_data, run_dir,
                                                    "mn-resume-1")
    try:
        cluster.client.stop_job("mn-resume-1")
        assert wait_job(cluster.client, "mn-resume-1", timeout=120) in ("STOPPED", "FAILED")
    finally:
        signal_all(actors, "kill")  # frozen, they write nothing more: the blocks kept are those seen here
    kept = set(parts_in(run_dir))
    assert kept and not storage.exists(storage.join(run_dir, "features", "_DONE.json"))
    submit_script(cluster, config, submission_id="mn-resume-2")
    status = wait_job(cluster.client, "mn-resume-2")
    assert status == "SUCCEEDED", cluster.client.get_job_logs("mn-resume-2")[-4000:]
    summary = storage.read_json(storage.join(run_dir, "features", "summary.json"))
    assert summary["blocks_resumed"] == len(kept), (summary, sorted(kept),
                                                    cluster.client.get_job_logs("mn-resume-2")[-4000:])
    assert summary["blocks_resumed"] + summary["blocks_computed"] == summary["blocks"]
    assert 0 < len(kept) < summary["blocks"]
    assert_same_result(run_dir, reference)


def test_node_hosting_the_sampler_dies_mid_epoch(cluster, tmp_path):
    """Fault (c): the node with the detached CurriculumSampler dies mid-epoch; the actor comes back
    on another node from the state in the bucket and the epochs complete: 0 lost, 0 served twice."""
    from test_sampler_on_cpu import plan_table
    from testkit import commit_plan

    run_dir = f"s3://saerl-test/mn-sampler-{secrets.token_hex(3)}"
    commit_plan(run_dir, plan_table(n_clusters=4, per_cluster=12, ratio=0.25))
    job = cluster.client.submit_job(
        entrypoint=f"python tests/drills/sampler_node_loss.py {run_dir}", submission_id="mn-sampler",
        runtime_env={"working_dir": str(REPO)},
        entrypoint_resources={"head": 1},  # the trainer side must survive: only the sampler's node dies
    )
    request = storage.join(run_dir, "_drill", "kill_node.json")
    deadline = time.time() + 600
    while not storage.exists(request):
        assert time.time() < deadline and str(cluster.client.get_job_status(job)) in ("PENDING", "RUNNING"), \
            cluster.client.get_job_logs(job)[-3000:]
        time.sleep(0.3)
    cluster.kill("w2")
    try:
        status = wait_job(cluster.client, job)
        logs = cluster.client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        result = json.loads(next(l for l in reversed(logs.splitlines()) if l.startswith("DRILL "))[6:])
        assert result["kills"] == 1 and result["epochs"] >= 3
        assert result["lost"] == result["duplicated"] == 0
        assert result["lost_reward_groups"] == result["double_counted_reward_groups"] == 0
    finally:
        cluster.restart_worker("w2")


def trainer_plan(n: int = 8):
    import pyarrow as pa

    return pa.table({
        "position": pa.array(range(n), pa.int64()), "batch": pa.array([i // 4 for i in range(n)], pa.int64()),
        "id": [f"q{i:03d}" for i in range(n)], "prompt": [f"What is {i}+{i}?" for i in range(n)],
        "answer": [str(2 * i) for i in range(n)], "source": ["gsm8k"] * n,
        "cluster": pa.array([i // 4 for i in range(n)], pa.int32()),
        "difficulty_pred": pa.array([float(i) for i in range(n)], pa.float32()), "mixed": [False] * n,
    })


def test_trainer_side_reads_and_checkpoints_cross_nodes_only_through_the_run_dir(cluster):
    """Issue 23: OpenRLHF's trainer actor on a node that cannot see the driver's disk (worker w3 has an
    empty tmpfs over the driver's scratch folder). A prompt file the driver wrote to a local run_dir is
    not there (the old path: FileNotFoundError); with run_dir on S3 the trainer reads every plan row, and
    a checkpoint shard w3's rank wrote locally reaches the driver's node through the bucket."""
    from testkit import commit_plan

    hidden = tempfile.mkdtemp(prefix="/tmp/saerl-hidden-")
    run_dir = f"s3://saerl-test/mn-files-{secrets.token_hex(3)}"
    plan = trainer_plan()
    commit_plan(run_dir, plan)
    cluster.add_worker("w3", hide=hidden)
    try:
        cluster.wait_up(lambda: "w3" in cluster.node_ids() or None, "worker w3")
        job = cluster.client.submit_job(
            entrypoint=f"python tests/drills/trainer_files_on_another_node.py {run_dir} {hidden}",
            submission_id=f"mn-files-{secrets.token_hex(2)}", runtime_env={"working_dir": str(REPO)},
            entrypoint_resources={"head": 1},  # the driver on the head: its scratch is the hidden folder
        )
        status = wait_job(cluster.client, job, timeout=600)
        logs = cluster.client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        result = json.loads(next(l for l in reversed(logs.splitlines()) if l.startswith("DRILL "))[6:])
        assert result["local_run_dir"] == "FileNotFoundError"  # a driver-local path is nothing on w3
        assert result["object_store"] == plan.column("id").to_pylist()
        ckpt = result["checkpoint"]
        assert ckpt["tag"] == "global_step2" and not ckpt["here_before"] and ckpt["w3_before"] == []
        assert ckpt["here_after"] == "rank-1 shard written on w3"
    finally:
        cluster.kill("w3")
        shutil.rmtree(hidden, ignore_errors=True)
