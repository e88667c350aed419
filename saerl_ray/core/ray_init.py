"""Starting or joining Ray the same way from the CLI, jobs and tests.

    init_ray(cfg.ray)   # no address: a private local cluster; under `ray job submit`: the job's cluster

Joining never hangs silently: with no address configured we start a *new* local cluster
(`address="local"`), never the one a stale `ray_current_cluster` file names (a head that died leaves
that file behind and a bare `ray.init()` waits on it forever); a configured address that does not
answer within `connect_timeout_s` is an error naming it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from urllib.parse import urlparse

from saerl_ray.core.config import RayConfig, UserError


class RayUnreachable(UserError, ConnectionError):
    """The configured Ray address did not answer: the message names it and what to check."""


def _gcs_host_port(address: str) -> tuple[str, int] | None:
    """host:port of a GCS address; None for forms we cannot probe ("auto", ray:// client, http job API)."""
    if address == "auto" or "://" in address:
        return None
    u = urlparse(f"//{address}")
    return (u.hostname, u.port) if u.hostname and u.port else None


def wait_reachable(address: str, timeout_s: float) -> None:
    target = _gcs_host_port(address)
    if target is None:
        return
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise RayUnreachable(
                    f"Ray at {address} did not answer within {timeout_s:.0f}s ({e}). Is the head running "
                    "(`ray status --address ...`)? Unset ray.address / RAY_ADDRESS to start a local cluster."
                ) from None
            time.sleep(1)


def leave_job_working_dir() -> None:
    """Run a job's driver from its own scratch dir, not from Ray's copy of the uploaded working dir.

    On a fresh cluster Ray may unpack that copy a second time while the driver runs (the directory is
    deleted and an identical one made at the same path): the driver's cwd is then gone and the next
    library that asks for it fails (tests/test_multinode_on_cpu.py saw transformers die in
    `Path("src").resolve()`). A submitted job's paths are absolute or URIs (`saerl_ray.submit`) and its
    imports use sys.path's absolute entries, so nothing needs that cwd."""
    import tempfile

    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = "working_dir_files"
    if "working_dir_files" in cwd:
        os.chdir(tempfile.mkdtemp(prefix="saerl-driver-"))


# Ray Train's placement-group cleaner polls the state API, which needs the dashboard a private local
# cluster runs without, and logs a warning on every poll (hundreds per training run).
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
QUIET_HOOK = "saerl_ray.core.ray_init.quiet_worker_logs"


def quiet_worker_logs() -> None:
    """Worker setup hook of a local cluster without a dashboard (see CLEANER_LOGGER)."""
    import logging

    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster this process belongs to, or start a private local one. Idempotent."""
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
        leave_job_working_dir()
        wait_reachable(address, cfg.connect_timeout_s)
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, dashboard_host=cfg.dashboard_host,
                 runtime_env=None if cfg.include_dashboard else {"worker_process_setup_hook": QUIET_HOOK}, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # Not on a terminal, Ray Data's bars turn into a progress banner every few seconds in the log.
    ctx.enable_progress_bars = sys.stderr.isatty() and os.environ.get("CI") is None
