"""One pipeline stage as a Ray job entrypoint: the `saerl-ray` CLI, runnable from a working_dir.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env_core.yaml \
        -- python jobs/stage.py features --config configs/gsm8k_math500.yaml --features.num_actors 4

Same flags as `saerl-ray <stage>`; use it when the package is not installed on the cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saerl_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
