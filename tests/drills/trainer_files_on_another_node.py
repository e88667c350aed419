"""Ray job entrypoint for the multi-node test's trainer-files row: the OpenRLHF launcher runs here (the
driver, on the head) and the trainer-side code runs in an actor on worker `w3`, whose raylet was started
in a private mount namespace with an empty tmpfs over `<hidden>`: the driver's node-local files under
`<hidden>` do not exist there, as on a real second machine.

    python tests/drills/trainer_files_on_another_node.py s3://bucket/run /tmp/saerl-hidden-x
Last stdout line: `DRILL {json}`:
- `local_run_dir`: what the trainer side got for a prompt file the driver wrote to a local run_dir (the
  only kind the trainers took before): the error's class name, or the ids it read;
- `object_store`: the plan ids the trainer side read for run_dir on the object store;
- `checkpoint`: the shard bytes w3's rank wrote into its node-local checkpoint folder, as this node got
  them back through the run directory, and what w3 had locally before (must be nothing of this run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# torch before pyarrow's AWS SDK starts (saerl_ray.core.storage._s3 explains the crash otherwise).
import torch  # noqa: E402, F401, I001
import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from saerl_ray.core import storage  # noqa: E402
from saerl_ray.core.config import load_config  # noqa: E402
from saerl_ray.trainers import openrlhf_launch as launch  # noqa: E402
from saerl_ray.trainers.run_files import OpenRLHFFiles, _call  # noqa: E402

TAG = "global_step2"
SHARD = f"_actor/{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"


@ray.remote(num_cpus=0)
class Host:
    """A process on w3 for the trainer-side functions to run in (through Ray's `__ray_call__`)."""


def trainer_reads(flags: list[str], env: dict[str, str]) -> list[str] | str:
    """SaerlPPOTrainer's read path: its env, `OpenRLHFFiles.fetch_inputs` on OpenRLHF's args, then the plain
    file open OpenRLHF's `prepare_datasets` does. Returns the label ids, or the error's class name."""
    import pyarrow.parquet as pq

    os.environ.update(env)
    args = SimpleNamespace(data=SimpleNamespace(prompt_dataset=launch.flag_value(flags, "--data.prompt_dataset", "")),
                           eval=SimpleNamespace(dataset=None),
                           ckpt=SimpleNamespace(path=launch.flag_value(flags, "--ckpt.path", "")))
    try:
        files = OpenRLHFFiles.from_env(args)
        if files is not None:
            files.fetch_inputs(args)
        with open(args.data.prompt_dataset, "rb") as f:
            labels = pq.read_table(f).column("label").to_pylist()
    except OSError as e:
        return type(e).__name__
    return [json.loads(label)["id"] for label in labels]


def rank_writes_shard(ckpt_path: str) -> list[str]:
    """What DeepSpeed's rank 1 leaves on its own node after `save_ckpt(tag)`; returns what was there before."""
    before = sorted(str(p) for p in Path(ckpt_path).rglob("*")) if Path(ckpt_path).exists() else []
    shard = Path(ckpt_path) / SHARD
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"rank-1 shard written on w3")
    (Path(ckpt_path) / "_actor" / "latest").write_text(TAG)
    return before


def config(run_dir: str):
    return load_config(None, {"run_dir": run_dir, "plan.batch_size": 4, "train.backend": "openrlhf",
                              "train.num_generations": 4, "train.steps": 2})


def main(run_dir: str, hidden: str) -> None:
    ray.init()
    os.environ["SAERL_SCRATCH"] = hidden  # the driver's node-local scratch: invisible on w3
    w3 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("w3"))
    host = Host.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w3, soft=False)).remote()
    result = {}

    # A local run_dir, as the trainers required before: the file exists only on the driver's disk.
    local = config(str(Path(hidden) / "run"))
    storage.copy_tree(storage.join(run_dir, "plan"), storage.join(local.run_dir, "plan"))
    flags = launch.build_flags(local, launch.write_prompt_file(local, "sampler-x", 4), "policy")
    env = launch.trainer_env("sampler-x", 8, stage_dir=launch.out_dir(local), scratch=launch.scratch_dir(local))
    result["local_run_dir"] = ray.get(host.__ray_call__.remote(_call, trainer_reads, flags, env))

    # The run_dir on the object store: what the launcher writes and the trainer side reads.
    cfg = config(run_dir)
    flags = launch.build_flags(cfg, launch.write_prompt_file(cfg, "sampler-x", 4), "policy")
    env = launch.trainer_env("sampler-x", 8, stage_dir=launch.out_dir(cfg), scratch=launch.scratch_dir(cfg))
    result["object_store"] = ray.get(host.__ray_call__.remote(_call, trainer_reads, flags, env))

    # A checkpoint rank 1 writes on w3, uploaded by the trainer's hook, restored on this node.
    ckpt = launch.flag_value(flags, "--ckpt.path", "")
    w3_before = ray.get(host.__ray_call__.remote(_call, rank_writes_shard, ckpt))
    files = OpenRLHFFiles(launch.out_dir(cfg), launch.scratch_dir(cfg), ckpt)
    files.upload([host], TAG, keep=2)
    here_before = (Path(ckpt) / SHARD).exists()
    tag = files.restore([], resume=True)  # this node's trainer: pointer only
    files.mirror.pull(files.parts(tag), [files.POINTER])  # as a rank on this node gets it
    result["checkpoint"] = {"tag": tag, "w3_before": w3_before, "here_before": here_before,
                            "here_after": (Path(ckpt) / SHARD).read_text()}
    print("DRILL " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
