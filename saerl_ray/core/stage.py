"""Stage bookkeeping that stays correct where there is no atomic rename (object stores).

A stage writes its files straight into `<run_dir>/<stage>/` and its `_DONE.json` marker (holding the
stage's fingerprint: config + input markers) LAST. A reader trusts a stage only when the marker exists
and its fingerprint matches; `begin()` deletes an old marker before anything else, so a writer killed
at any point leaves nothing a reader would trust. Finished sub-units of a killed run (feature blocks,
label chunks) are kept for the rerun when `_PARTIAL.json` says they were made with the same
fingerprint; otherwise the folder is emptied first.

    from saerl_ray.core.stage import Stage
    st = Stage(run_dir, "features", fp)
    if not st.done():
        out = st.begin()                     # a path string: local dir or URI prefix
        storage.write_parquet(table, storage.join(out, "part-00000.parquet"))
        st.commit(summary)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from saerl_ray.core import storage
from saerl_ray.core.config import UserError

MARKER = "_DONE.json"
PARTIAL = "_PARTIAL.json"


class StageNotReady(UserError, FileNotFoundError):
    """An upstream stage has not finished: the message says which command to run."""


class Stage:
    def __init__(self, run_dir: str | Path, name: str, fingerprint: str):
        self.run_dir = storage.resolve(run_dir)
        self.name = name
        self.fingerprint = fingerprint
        self.out = storage.join(self.run_dir, name)

    def marker(self) -> dict[str, Any] | None:
        path = storage.join(self.out, MARKER)
        return storage.read_json(path) if storage.exists(path) else None

    def done(self) -> bool:
        m = self.marker()
        return m is not None and m.get("fingerprint") == self.fingerprint

    def begin(self, keep_partial: bool = True) -> str:
        """Open the stage folder for writing; returns it. The old marker goes first."""
        storage.delete(storage.join(self.out, MARKER))
        stamp = storage.join(self.out, PARTIAL)
        same = storage.exists(stamp) and storage.read_json(stamp).get("fingerprint") == self.fingerprint
        if not (keep_partial and same):
            storage.delete(self.out)
            storage.write_json(stamp, {"fingerprint": self.fingerprint, "stage": self.name, "time": time.time()})
        for torn in storage.list_dir(self.out, suffix="", recursive=True):
            if storage.PARTIAL_TAG in torn:  # a local write the kill interrupted; its unit is redone
                storage.delete(storage.join(self.out, torn))
        if not storage.is_uri(self.out):
            Path(self.out).mkdir(parents=True, exist_ok=True)
        return self.out

    def commit(self, summary: dict[str, Any] | None = None) -> str:
        if summary is not None:
            storage.write_json(storage.join(self.out, "summary.json"), summary)
        storage.delete(storage.join(self.out, PARTIAL))
        storage.write_json(
            storage.join(self.out, MARKER),
            {"fingerprint": self.fingerprint, "stage": self.name, "time": time.time()},
        )
        return self.out

    def summary(self) -> dict[str, Any]:
        p = storage.join(self.out, "summary.json")
        return storage.read_json(p) if storage.exists(p) else {}


def marker_of(run_dir: str | Path, name: str) -> str:
    """The fingerprint a finished upstream stage committed; downstream stages hash it as an input."""
    m = Stage(run_dir, name, "").marker()
    if m is None:
        raise StageNotReady(
            f"stage {name!r} has not finished in {run_dir} (no {name}/{MARKER}); run `saerl-ray {name}` first"
        )
    return m["fingerprint"]
