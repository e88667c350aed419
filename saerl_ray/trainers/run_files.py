"""Files a GPU trainer's processes read and write, with `run_dir` on an object store or on a local disk.

The clusters as shipped share nothing between nodes but the run directory, and that is an object
store (`s3://`, `gs://`). OpenRLHF and verl open their inputs and write their checkpoints with plain
file I/O, from processes on whichever node Ray placed them. So:
- inputs the launcher writes (the prompt/dataset parquet, the held-out set) go to `<run_dir>/<stage>/`
  through `storage`; the process that opens one calls `fetch`, which hands back a path on its own node;
- each library checkpoints into a node-local scratch folder (`node_scratch`, the same path string on
  every node); after every save the hooks we own (SaerlPPOTrainer, SaerlRayPPOTrainer) have one
  process per node `push` what that node wrote to `<run_dir>/<stage>/ckpt/`, then `publish` the
  library's "latest" pointer, last, so a pointer in the store always names a complete checkpoint;
- on resume every node `pull`s the checkpoint the stored pointer names before the library looks for it.
With a local run_dir nothing is copied for inputs: it is then one machine's disk or a shared volume.

    scratch = node_scratch(cfg.run_dir, "openrlhf")            # driver: the string every node uses
    local = fetch("s3://b/run/openrlhf/prompts.parquet", scratch)   # in the process that opens it
    Mirror(local_ckpt, remote_ckpt).push(["_actor/global_step10"])
    run_once_per_node(actor_handles, Mirror(...).pull, ["_actor/global_step10"], ["_actor/latest"])
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from saerl_ray.core import storage


def node_scratch(run_dir: str, stage: str) -> str:
    """A node-local folder for `stage` of this run: the same absolute path string on every node
    (`SAERL_SCRATCH`, else the system temp dir), so one flag value serves all of a library's ranks.
    A local run_dir is its own scratch (`<run_dir>/<stage>`) unless SAERL_SCRATCH is set: one machine's
    disk or a shared volume needs no second copy, and the mirror below is then a no-op."""
    base = os.environ.get("SAERL_SCRATCH")
    if not storage.is_uri(run_dir) and not base:
        return storage.join(storage.resolve(run_dir), stage)
    base = base or tempfile.gettempdir()
    key = hashlib.sha1(storage.resolve(run_dir).encode()).hexdigest()[:12]
    return str(Path(base).resolve() / f"saerl-{stage}-{key}")


def fetch(path: str, scratch: str) -> str:
    """A path this process can open for `path`: itself when local, else a fresh copy of the object
    under `<scratch>/inputs/` on this node (fetched on every call: a rerun may have replaced it)."""
    if not storage.is_uri(path):
        return storage.resolve(path)
    dest = Path(scratch) / "inputs" / storage.name(path)
    storage.write_bytes(dest, storage.read_bytes(path))
    return str(dest)


# ------------------------------------------------------------------ one call per node


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _call(_actor: Any, fn: Callable, *args: Any) -> Any:
    """Runs inside an actor through Ray's built-in `__ray_call__` (the actor instance comes first)."""
    return fn(*args)


def run_once_per_node(handles: Iterable[Any] | None, fn: Callable, *args: Any, here_args: tuple | None = None) -> list:
    """`fn(*args)` once on every node that hosts one of `handles` (Ray actors), inside one of them;
    and in this process too when no handle shares its node (with `here_args` instead of `args` when
    given). Waits for all; returns results."""
    import ray

    handles = list(handles or [])
    nodes = ray.get([h.__ray_call__.remote(_call, node_id) for h in handles]) if handles else []
    chosen = {}
    for node, handle in zip(nodes, handles):
        chosen.setdefault(node, handle)
    results = ray.get([h.__ray_call__.remote(_call, fn, *args) for h in chosen.values()])
    if not ray.is_initialized() or node_id() not in chosen:
        results.append(fn(*(args if here_args is None else here_args)))
    return results


# ------------------------------------------------------------------ checkpoint mirror


@dataclass(frozen=True)
class Mirror:
    """A library's node-local checkpoint folder (`local`) and its copy in the run directory (`remote`).
    Paths given to the methods are relative to both roots."""

    local: str
    remote: str

    @property
    def same(self) -> bool:
        """Local and stored copies are one folder (a local run_dir): nothing to move, nothing to delete."""
        return not storage.is_uri(self.remote) and Path(self.local).resolve() == Path(self.remote).resolve()

    def push(self, subdirs: Iterable[str]) -> int:
        """Upload every file this node has under `subdirs` that the store lacks (or holds at another
        size); returns the number of files sent. Run on every node that wrote a part."""
        if self.same:
            return 0
        sent = 0
        for sub in subdirs:
            src = Path(self.local) / sub
            if src.is_dir():
                sent += storage.sync_tree(str(src), storage.join(self.remote, sub))
        return sent

    def publish(self, files: Iterable[str]) -> None:
        """Upload the library's pointer files (e.g. DeepSpeed's `latest`), after every node pushed."""
        if self.same:
            return
        for rel in files:
            src = Path(self.local) / rel
            if src.is_file():
                storage.write_bytes(storage.join(self.remote, rel), src.read_bytes())

    def read_pointer(self, rel: str) -> str | None:
        """The stored pointer file's text (stripped), or None when no checkpoint was published."""
        path = storage.join(self.remote, rel)
        return storage.read_text(path).strip() if storage.exists(path) else None

    def pull(self, subdirs: Iterable[str], files: Iterable[str]) -> int:
        """Make this node's folder hold exactly the stored `subdirs` and pointer `files` (an emptied
        folder when they are `[]`, so a stale local checkpoint is never what the library resumes)."""
        if self.same:
            return 0
        shutil.rmtree(self.local, ignore_errors=True)
        Path(self.local).mkdir(parents=True, exist_ok=True)
        got = 0
        for sub in subdirs:
            got += storage.sync_tree(storage.join(self.remote, sub), str(Path(self.local) / sub))
        for rel in files:
            src = storage.join(self.remote, rel)
            if storage.exists(src):
                storage.write_bytes(Path(self.local) / rel, storage.read_bytes(src))
                got += 1
        return got

    def discard(self, subdirs: Iterable[str]) -> None:
        """Delete stored `subdirs`: what a killed upload left of a checkpoint it never published, before
        the same tag is uploaded again (sync_tree would keep the old run's shards where sizes match)."""
        if self.same:
            return
        for sub in subdirs:
            storage.delete(storage.join(self.remote, sub))

    def prune(self, parent: str, prefix: str, keep: int | None) -> list[str]:
        """Delete stored checkpoints `<parent>/<prefix><step>` but the newest `keep` (None: keep all);
        returns the deleted names. The library prunes its own folder when it is the stored one."""
        if keep is None or keep < 1 or self.same:
            return []
        base = storage.join(self.remote, parent) if parent else self.remote
        steps = {}
        for rel in storage.list_dir(base, recursive=True):
            top = rel.split("/", 1)[0]
            tail = top[len(prefix):]
            if top.startswith(prefix) and tail.isdigit():
                steps[top] = int(tail)
        old = sorted(steps, key=steps.get)[:-keep] if len(steps) > keep else []
        for name in old:
            storage.delete(storage.join(base, name))
        return old


def actor_handles(group: Any) -> list:
    """The Ray actors of an OpenRLHF `RayActorGroup` (rank order; [] for None)."""
    return list(getattr(group, "_actor_handlers", None) or [])


# ------------------------------------------------------------------ OpenRLHF 0.11.2


class OpenRLHFFiles:
    """What SaerlPPOTrainer (openrlhf_trainer.py) moves: its inputs onto its node, DeepSpeed checkpoints
    between every node's `--ckpt.path` and `<stage_dir>/ckpt`, TensorBoard logs to `<stage_dir>/tensorboard`.

    DeepSpeed writes checkpoint `<tag>` as `<ckpt.path>/_actor/<tag>/` with each rank's shards on its own
    node (rank 0 adds the module states and the pointer `_actor/latest`; with `--ckpt.save_hf` an HF copy
    `<tag>_hf/`). On resume every rank reads `latest`, the module states and all ranks' optimizer shards."""

    POINTER = "_actor/latest"

    def __init__(self, stage_dir: str, scratch: str, ckpt_path: str):
        self.stage_dir, self.scratch = stage_dir, scratch
        self.mirror = Mirror(ckpt_path, storage.join(stage_dir, "ckpt"))

    @classmethod
    def from_env(cls, args: Any) -> "OpenRLHFFiles | None":
        """From SAERL_STAGE_DIR / SAERL_SCRATCH_DIR (the launcher's trainer_env); None: no transfers."""
        stage_dir, scratch = os.environ.get("SAERL_STAGE_DIR"), os.environ.get("SAERL_SCRATCH_DIR")
        return cls(stage_dir, scratch, args.ckpt.path) if stage_dir and scratch else None

    @staticmethod
    def parts(tag: str) -> list[str]:
        return [f"_actor/{tag}", f"{tag}_hf"]

    def fetch_inputs(self, args: Any) -> None:
        """Point OpenRLHF's dataset flags at copies on this node (before `prepare_datasets` opens them)."""
        args.data.prompt_dataset = fetch(args.data.prompt_dataset, self.scratch)
        if getattr(args.eval, "dataset", None):
            args.eval.dataset = fetch(args.eval.dataset, self.scratch)

    def restore(self, actors: list, resume: bool) -> str | None:
        """Every actor node's `--ckpt.path` reset to the stored checkpoint (resuming) or to nothing; this
        process's node, when no actor is on it, gets the pointer only (it only checks `_actor` exists)."""
        tag = self.mirror.read_pointer(self.POINTER) if resume else None
        parts, pointer = (self.parts(tag), [self.POINTER]) if tag else ([], [])
        run_once_per_node(actors, self.mirror.pull, parts, pointer, here_args=([], pointer))
        return tag

    def upload(self, actors: list, tag: str, keep: int | None) -> None:
        """After a save of `tag`: every node's part, then `latest` from rank 0's node, then pruning to `keep`."""
        import ray

        if self.mirror.read_pointer(self.POINTER) != tag:
            self.mirror.discard(self.parts(tag))
        run_once_per_node(actors, self.mirror.push, self.parts(tag))
        if actors:
            ray.get(actors[0].__ray_call__.remote(_call, self.mirror.publish, [self.POINTER]))
        else:
            self.mirror.publish([self.POINTER])
        self.mirror.prune("_actor", "global_step", keep)

    def upload_logs(self, local_dir: str | None) -> None:
        if local_dir and os.path.isdir(local_dir):
            storage.sync_tree(local_dir, storage.join(self.stage_dir, "tensorboard"))


# ------------------------------------------------------------------ verl 0.9.1


def saerl_settings(config: Any) -> Any:
    """`data.saerl` of a composed verl config (the launcher's settings), or {}."""
    data = config.get("data") if hasattr(config, "get") else None
    return (data.get("saerl") if data is not None else None) or {}


class VerlFiles:
    """What SaerlTaskRunner / SaerlRayPPOTrainer (verl_trainer.py) move: the dataset files onto the
    TaskRunner's node, checkpoints between every node's `trainer.default_local_dir` and `<stage_dir>/ckpt`.

    verl writes step n as `<default_local_dir>/global_step_<n>/` (each FSDP rank its own shards of
    `actor/` on its node; the trainer `data.pt` on its node) and then, in the trainer, the pointer
    `latest_checkpointed_iteration.txt`."""

    TRACKER = "latest_checkpointed_iteration.txt"

    def __init__(self, stage_dir: str, scratch: str, local_ckpt: str):
        self.stage_dir, self.scratch = stage_dir, scratch
        self.mirror = Mirror(str(Path(local_ckpt).resolve()), storage.join(stage_dir, "ckpt"))

    @classmethod
    def of(cls, config: Any) -> "VerlFiles | None":
        s = saerl_settings(config)
        if not (s.get("stage_dir") and s.get("scratch")):
            return None
        return cls(str(s["stage_dir"]), str(s["scratch"]), str(config.trainer.default_local_dir))

    def fetch_inputs(self, config: Any) -> None:
        """`data.train_files` / `data.val_files` pointed at copies on this node (before verl opens them)."""
        from omegaconf import open_dict

        with open_dict(config):
            config.data.train_files = fetch(str(config.data.train_files), self.scratch)
            config.data.val_files = fetch(str(config.data.val_files), self.scratch)

    def upload(self, workers: list, step: int, keep: int | None) -> None:
        if self.mirror.read_pointer(self.TRACKER) != str(step):
            self.mirror.discard([f"global_step_{step}"])
        run_once_per_node(workers, self.mirror.push, [f"global_step_{step}"])
        self.mirror.publish([self.TRACKER])  # this process wrote it, after every rank's save returned
        self.mirror.prune("", "global_step_", keep)

    def restore(self, workers: list, resume: bool) -> int | None:
        text = self.mirror.read_pointer(self.TRACKER) if resume else None
        step = int(text) if text and text.isdigit() else None
        parts, pointer = ([f"global_step_{step}"], [self.TRACKER]) if step is not None else ([], [])
        # This process (verl's trainer) reads the pointer and the step's data.pt, never the shards.
        here = ([], pointer + ([f"global_step_{step}/data.pt"] if step is not None else []))
        run_once_per_node(workers, self.mirror.pull, parts, pointer, here_args=here)
        return step
