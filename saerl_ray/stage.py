"""Stage bookkeeping: every stage writes into `<run_dir>/<stage>.tmp`, then renames it to
`<run_dir>/<stage>` with a `_DONE.json` marker holding the stage's fingerprint (config + inputs).

A rerun with the same fingerprint is a no-op; a changed fingerprint recomputes the stage, and the
stages that read it see a new input marker and recompute too. Inside a stage, finer-grained resume
(feature blocks) lives in the stage's own `.tmp` dir, which survives a kill.

    from saerl_ray.stage import Stage
    st = Stage(run_dir, "features", fp)
    if not st.done():
        ...write files into st.tmp...
        st.commit(summary)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

MARKER = "_DONE.json"


class Stage:
    def __init__(self, run_dir: str | Path, name: str, fingerprint: str):
        self.run_dir = Path(run_dir)
        self.name = name
        self.fingerprint = fingerprint
        self.out = self.run_dir / name
        self.tmp = self.run_dir / f"{name}.tmp"

    def done(self) -> bool:
        m = self.out / MARKER
        if not m.exists():
            return False
        return json.loads(m.read_text()).get("fingerprint") == self.fingerprint

    def begin(self, keep_partial: bool = True) -> Path:
        """Prepare the temp dir. Partial work from a killed run with the same fingerprint is kept."""
        stamp = self.tmp / "_FINGERPRINT"
        if self.tmp.exists() and (
            not keep_partial or not stamp.exists() or stamp.read_text() != self.fingerprint
        ):
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.fingerprint)
        return self.tmp

    def commit(self, summary: dict[str, Any] | None = None) -> Path:
        (self.tmp / "_FINGERPRINT").unlink(missing_ok=True)
        if summary is not None:
            (self.tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (self.tmp / MARKER).write_text(
            json.dumps({"fingerprint": self.fingerprint, "stage": self.name, "time": time.time()})
        )
        # Rename is atomic on one filesystem; the old output is moved aside first, then dropped.
        old = self.run_dir / f"{self.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old.exists():
            shutil.rmtree(old)
        return self.out

    def summary(self) -> dict[str, Any]:
        p = self.out / "summary.json"
        return json.loads(p.read_text()) if p.exists() else {}


def marker_of(run_dir: str | Path, name: str) -> str:
    """The fingerprint a finished upstream stage committed; downstream stages hash it as an input."""
    m = Path(run_dir) / name / MARKER
    if not m.exists():
        raise FileNotFoundError(
            f"stage {name!r} has not finished in {run_dir} (no {m}); run `saerl-ray {name}` first"
        )
    return json.loads(m.read_text())["fingerprint"]
