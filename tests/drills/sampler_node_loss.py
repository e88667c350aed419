"""Ray job entrypoint for the multi-node test's node-loss row (docs/sampler_api.md): a detached
CurriculumSampler placed on the worker node with resource `w2`, and a drill whose one actor kill is
that node going down. The test process, outside the cluster, takes the node down when this script
asks for it (`<run_dir>/_drill/kill_node.json`).

    python tests/drills/sampler_node_loss.py s3://bucket/run    # under `ray job submit`
Last stdout line: `DRILL {json}` with the drill's counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sampler_drill

import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402
from sampler_drill import drill  # noqa: E402

from saerl_ray.core import storage  # noqa: E402
from saerl_ray.core.config import load_config  # noqa: E402
from saerl_ray.sampler.actor import SAMPLER_NAMESPACE, CurriculumSampler, actor_name  # noqa: E402


def main(run_dir: str) -> None:
    ray.init()
    cfg = load_config(None, {
        "run_dir": run_dir, "plan.batch_size": 6, "sampler.retire_after": 2, "sampler.pace_min_groups": 2,
        "sampler.postpone_batches": 2, "sampler.checkpoint_every": 3, "sampler.checkpoint_min_seconds": 0.0,
        "sampler.detached": True,
    })
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("w2"))
    # Soft affinity: on w2 now; when w2 is gone, Ray restarts the actor wherever it fits.
    actor = CurriculumSampler.options(
        name=actor_name(cfg.run_dir), namespace=SAMPLER_NAMESPACE, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    ).remote(storage.join(run_dir, "plan", "plan.parquet"), cfg.sampler.model_dump(),
             storage.join(run_dir, "sampler"), cfg.plan.batch_size)
    ray.get(actor.ping.remote())
    request = storage.join(run_dir, "_drill", "kill_node.json")

    def take_node_down(_name: str) -> None:
        storage.write_json(request, {"node": node, "time": time.time()})
        while any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
            time.sleep(0.2)

    r = drill(cfg, kill="actor", kills=1, seed=0, epochs=3, kill_actor=take_node_down)
    print("DRILL " + json.dumps({
        "lost": r.lost, "duplicated": r.duplicated, "lost_reward_groups": r.lost_reward_groups,
        "double_counted_reward_groups": r.double_counted_reward_groups, "kills": r.kills, "epochs": r.epochs,
        "killed_node": node,
    }), flush=True)
    ray.kill(actor)


if __name__ == "__main__":
    main(sys.argv[1])
