"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os

from saerl_ray.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster this process belongs to, or start a local one. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Inside `ray job submit` RAY_ADDRESS is set and wins; locally we start a private cluster.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(
        ignore_reinit_error=True,
        include_dashboard=cfg.include_dashboard,
        log_to_driver=True,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, dashboard_host=cfg.dashboard_host, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("CI") is None
