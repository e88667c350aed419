"""Where a CurriculumSampler keeps its state: a compacted base plus a write-ahead log of operations,
and the conversion of a sampler's fields to that form and back (`snapshot`, `restore_into`).

Everything goes through `saerl_ray.core.storage`, so `<run_dir>` may be a local dir, a shared filesystem
or an object store (`s3://bucket/prefix`). Object stores have no append and no atomic rename, so there
the log is one small object per operation and every file is written whole, exactly once per name; on a
local or shared disk the log records of a process are lines appended to one open segment file
(`log/<gen>-<from>/<first op>.jsonl`, `[op, record]` per line), cheaper than creating a file per call (docs/decisions.md):

    <run_dir>/sampler/state.json                       the base: scalars and small lists as JSON,
                                                       naming its arrays file
    <run_dir>/sampler/arrays-<gen>-<op>.npz            the base's arrays (per-prompt records, ledger,
                                                       redo queue), loaded with allow_pickle=False
    <run_dir>/sampler/log/<gen>-<from>/<op>.json       one object per operation (a segment on disk); a folder per snapshot:
                                                       the operations after the one taken at <from>
    <run_dir>/sampler/decisions/<gen>-<op>.jsonl       the decisions of the operations folded into the
                                                       base written at <op>

`<op>` counts the sampler's mutating operations; `<gen>` (generation) changes when a whole state is
loaded over the running one (a trainer restoring an old checkpoint), so log records of the replaced
history can never be replayed on top of the new one. Restore = read the base, replay the log records
of its generation after its op, in order. A base is written decisions -> arrays -> state.json, and
only then are the log folders it covers deleted (one folder each: on an object store one listing and
one batched delete, not a request per operation), so a process killed at any point leaves a base
plus a log that together hold every acknowledged operation. Never pickle.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import numpy as np

from saerl_ray.core import storage

log = logging.getLogger("saerl_ray.sampler")

STATE_FILE = "state.json"
LOG_DIR = "log"
DECISIONS_DIR = "decisions"
STATE_VERSION = 2
# Per-prompt state saved for rows ever served or reported; `index` is the plan row.
ROW_DTYPE = np.dtype([
    ("index", "<i8"), ("attempts", "<i4"), ("reward_sum", "<f4"), ("wrong_run", "<i2"), ("last_served", "<i8"),
    ("served_epoch", "<i4"), ("postponed_epoch", "<i4"), ("saturated", "?"), ("retired", "?"),
])
_RECORD = re.compile(r"^(\d+)-(\d+)/(\d+)\.json$")
_LOG_SEGMENT = re.compile(r"^(\d+)-(\d+)/(\d+)\.jsonl$")  # local disk: records appended, `[op, record]` per line
_SEGMENT = re.compile(r"^(\d+)-(\d+)\.jsonl$")
_ARRAYS = re.compile(r"^(arrays-\d+-\d+\.npz|rows-\d+\.npy)$")


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A numpy array as JSON: dtype, shape, zlib+base64 of its little-endian bytes."""
    import zlib

    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError("object arrays are not stored (no pickle)")
    if a.dtype.names:  # a record array: its fields by name (their byte order is explicit in the descr)
        dtype: Any = [list(f) for f in a.dtype.descr]
    else:
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        dtype = a.dtype.str
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    import zlib

    spec = d["dtype"]
    dtype = np.dtype([tuple(f) for f in spec]) if isinstance(spec, list) else np.dtype(spec)
    if dtype.hasobject:
        raise ValueError("state holds an object array (refused: no pickle)")
    return np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype=dtype).reshape(d["shape"]).copy()


def plan_digest(ids: np.ndarray) -> str:
    """Identity of a plan's row order: a state only restores onto the plan it was written for."""
    h = hashlib.sha1(str(len(ids)).encode())
    h.update(b"\0".join(ids.tolist()))
    return h.hexdigest()[:16]


_PER_PROMPT_RESET = {"last_served": -1, "served_epoch": -1, "postponed_epoch": -1}


# ---------------------------------------------------------------- a sampler's state <-> JSON + arrays


def snapshot(s: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Everything a CurriculumState `s` needs to resume: JSON-able scalars/lists plus fresh numpy
    arrays (copies: the caller may encode and write them on another thread while serving goes on)."""
    touched = s._touched[: s._n_touched]
    rows = np.empty(len(touched), dtype=ROW_DTYPE)  # one buffer to copy and to write, not nine
    rows["index"] = touched
    for name in ROW_DTYPE.names[1:]:
        rows[name] = getattr(s, name)[touched]
    ledger = s.ledger
    if ledger:
        lseq = np.fromiter((e[0] for e in ledger), np.int64, len(ledger))
        llen = np.fromiter((len(e[1]) for e in ledger), np.int64, len(ledger))
        lidx = np.concatenate([e[1] for e in ledger])
        lep = np.concatenate([e[2] for e in ledger]).astype(np.int32)
    else:
        lseq, llen, lidx, lep = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    arrays = {"rows": rows, "ledger_seq": lseq, "ledger_len": llen, "ledger_idx": lidx, "ledger_epoch": lep,
              "redo": np.array(s.redo, np.int64).reshape(-1, 2)}
    st = {
        "version": STATE_VERSION, "plan_digest": s.digest, "prompts": s.n, "clusters": s.labels.tolist(),
        "mode": s.cfg.mode, "cfg": s.cfg.model_dump(mode="json"), "batch_size": s.batch_size,
        "uid": s.uid, "gen": s.gen, "ops": s.ops, "seq": s.seq, "ledger_floor": s.ledger_floor,
        "committed": s.committed, "tokens": list(s.tokens.items()),
        "epoch": s.epoch, "slot": s.slot, "epoch_served": s.epoch_served, "counters": dict(s.counters),
        "ptr": s.ptr.tolist(), "skip_credit": s.skip_credit.tolist(),
        "front": [list(q) for q in s.front], "deferred": [list(q) for q in s.deferred],
        "delayed": [[list(x) for x in q] for q in s.delayed],
        "tail": None if s.tail is None else list(s.tail),
        "ema": [None if np.isnan(x) else float(x) for x in s.ema],
        "best": [None if np.isinf(x) else float(x) for x in s.best], "groups": s.groups.tolist(),
    }
    return st, arrays


def encode_state(st: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One self-contained JSON object: the arrays inline."""
    return st | {"arrays": {k: encode_array(v) for k, v in arrays.items()}}


def decode_state_arrays(st: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a `state_dict()` object (version 2 `arrays`, or version 1 `rows` per field)."""
    if "arrays" in st:
        return {k: decode_array(v) for k, v in st["arrays"].items()}
    if isinstance(st.get("rows"), dict):
        fields = {k: decode_array(v) for k, v in st["rows"].items()}
        rows = np.empty(len(fields["index"]), ROW_DTYPE)
        for k, v in fields.items():
            rows[k] = v
        return {"rows": rows}
    raise ValueError("load_state_dict: not a sampler state (no arrays)")


def restore_into(s: Any, st: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Set a freshly initialised CurriculumState `s` to a snapshot (the inverse of `snapshot`)."""
    rows = arrays["rows"]
    if rows.dtype != ROW_DTYPE:
        raise ValueError(f"sampler state rows have fields {rows.dtype.names}, not the sampler's {ROW_DTYPE.names}")
    idx = rows["index"].astype(np.int64)
    s._touched = idx.copy() if len(idx) else np.empty(1024, np.int64)
    s._n_touched = len(idx)
    for name in ROW_DTYPE.names[1:]:
        arr = getattr(s, name)
        arr[:] = _PER_PROMPT_RESET.get(name, 0)
        arr[idx] = rows[name]
    s.epoch, s.slot, s.epoch_served = int(st["epoch"]), int(st["slot"]), int(st["epoch_served"])
    s.counters |= {k: int(v) for k, v in st["counters"].items()}
    s.ptr = np.array(st["ptr"], np.int64)
    s.skip_credit = np.array(st["skip_credit"], np.int64)
    s.front = [deque(q) for q in st["front"]]
    s.deferred = [deque(q) for q in st["deferred"]]
    s.delayed = [deque((int(d), int(i)) for d, i in q) for q in st["delayed"]]
    s.tail = None if st["tail"] is None else deque(st["tail"])
    s.ema = np.array([np.nan if x is None else x for x in st["ema"]], np.float64)
    s.best = np.array([-np.inf if x is None else x for x in st["best"]], np.float64)
    s.groups = np.array(st["groups"], np.int64)
    s.uid = st.get("uid") or s.uid  # a version-1 state has none: it starts a history here
    s.seq = int(st.get("seq", 0))
    s.ledger_floor = int(st.get("ledger_floor", s.seq))
    s.committed = int(st.get("committed", 0))
    s.tokens = OrderedDict((str(t), int(n)) for t, n in st.get("tokens", []))
    if "ledger_seq" in arrays:
        bounds = np.cumsum(arrays["ledger_len"])[:-1]
        for q, r, e in zip(arrays["ledger_seq"].tolist(), np.split(arrays["ledger_idx"], bounds),
                           np.split(arrays["ledger_epoch"], bounds)):
            s.ledger.append((int(q), r.astype(np.int64), e.astype(np.int32)))
        s.ledger_rows = int(arrays["ledger_len"].sum())
    if "redo" in arrays:
        s.redo = deque((int(i), int(e)) for i, e in arrays["redo"].tolist())


def _name(gen: int, op: int) -> str:
    return f"{gen:06d}-{op:012d}"


class SamplerStore:
    """The files of one sampler (`root` = `<run_dir>/sampler`). One writer process at a time: the run's
    named actor. Base writes may run on a background thread; log appends happen on the caller's."""

    def __init__(self, root: str):
        self.root = storage.resolve(root)
        self._writer: threading.Thread | None = None
        self._folder = _name(0, 0)  # log folder new records go to: the last snapshot's (gen, op)
        self._folders: deque[str] = deque()  # log folders this process may still have to delete, oldest first
        self._arrays_file: str | None = None  # the arrays file the current base names
        self._unwritten: list[dict[str, Any]] = []  # decisions a failed base write did not store
        self.last_error: BaseException | None = None
        self._local = not storage.is_uri(self.root)
        self._segment: Any = None  # the open log segment (local storage only) and its folder
        self._segment_folder: str | None = None

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ------------------------------------------------------------ log

    def _start_folder(self, gen: int, op: int) -> list[str]:
        """A snapshot was taken at (gen, op): later records go to a new folder. Returns the folders the
        base written from this snapshot holds (to delete once it is written)."""
        name = _name(gen, op)
        if name != self._folder:  # no call since the last snapshot: the current folder is still empty
            if self._folder not in self._folders:
                self._folders.append(self._folder)
            self._folder = name
        doomed, self._folders = [f for f in self._folders if f != self._folder], deque()
        return doomed

    def append(self, gen: int, op: int, record: dict[str, Any]) -> None:
        """Make one operation durable; raises (StorageError) when it could not be."""
        data = json.dumps(record, separators=(",", ":")).encode()
        if self._local:
            self._append_local(op, data)
        else:
            storage.write_bytes(self.path(LOG_DIR, self._folder, f"{op:012d}.json"), data)

    def _append_local(self, op: int, data: bytes) -> None:
        """On a local or shared filesystem one unbuffered write to an open segment file: once write()
        returns, the record survives the process (creating a file per record cost ~1.4 ms here). A
        process killed inside write() leaves a torn last line, of a call that never returned."""
        try:
            if self._segment is None or self._segment_folder != self._folder:
                self.close_segment()
                folder = Path(self.path(LOG_DIR, self._folder))
                folder.mkdir(parents=True, exist_ok=True)
                self._segment = open(folder / f"{op:012d}.jsonl", "ab", buffering=0)
                self._segment_folder = self._folder
            self._segment.write(b"[%d,%s]\n" % (op, data))
        except OSError as e:
            self.close_segment()  # never append after a line that may be torn
            raise storage.StorageError(f"sampler log {self.path(LOG_DIR, self._folder)}: {e}") from e

    def close_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()
        self._segment, self._segment_folder = None, None

    def read_log(self, gen: int, after: int) -> list[dict[str, Any]]:
        """Records of generation `gen` with op > `after`, in op order; a gap is an error, not a skip."""
        found: dict[int, Any] = {}
        for n in storage.list_dir(self.path(LOG_DIR), recursive=True):
            m = _RECORD.match(n) or _LOG_SEGMENT.match(n)
            if not m or int(m[1]) != gen:
                continue
            folder = n.split("/")[0]
            if folder not in self._folders and folder != self._folder:
                self._folders.append(folder)
            if n.endswith(".json"):
                if int(m[3]) > after:
                    found[int(m[3])] = n
                continue
            for op, rec in self._segment_records(n):
                if op > after:
                    found[op] = rec
        ops = sorted(found)
        if ops and ops != list(range(after + 1, after + 1 + len(ops))):
            missing = sorted(set(range(after + 1, ops[-1] + 1)) - set(ops))[:5]
            raise RuntimeError(
                f"sampler log {self.path(LOG_DIR)} misses record(s) {missing} of generation {gen} after base op "
                f"{after}: it was edited by hand or written by two actors at once; restore cannot be exact"
            )
        return [storage.read_json(self.path(LOG_DIR, r)) if isinstance(r, str) else r for r in map(found.get, ops)]

    def _segment_records(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        lines = storage.read_bytes(self.path(LOG_DIR, name)).split(b"\n")
        out = []
        for k, line in enumerate(lines):
            if not line:
                continue
            try:
                op, rec = json.loads(line)
            except ValueError:
                if k == len(lines) - 1:  # no newline after it: torn by a kill inside write(), never acknowledged
                    break
                raise RuntimeError(f"sampler log {self.path(LOG_DIR, name)} line {k + 1} is not a record") from None
            out.append((int(op), rec))
        return out

    # ------------------------------------------------------------ base

    def read_base(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """(state.json, its arrays) or None for a fresh run."""
        state_path = self.path(STATE_FILE)
        if not storage.exists(state_path):
            return None
        st = storage.read_json(state_path)
        if "arrays_file" in st:
            arrays = self._read_arrays(st["arrays_file"])
        elif "rows_file" in st:  # version 1: one record array
            arrays = {"rows": self._read_npy(st["rows_file"])}
        else:
            raise ValueError(f"{state_path}: names no arrays file")
        self._arrays_file = st.get("arrays_file")
        return st, arrays

    def _read_arrays(self, name: str) -> dict[str, np.ndarray]:
        path = self.path(name)
        if not storage.exists(path):
            raise FileNotFoundError(f"sampler state {self.path(STATE_FILE)} names {path}, which is missing")
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _read_npy(self, name: str) -> np.ndarray:
        path = self.path(name)
        if not storage.exists(path):
            raise FileNotFoundError(f"sampler state {self.path(STATE_FILE)} names {path}, which is missing")
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)

    def next_generation(self) -> int:
        """A generation no record or decisions segment uses yet (a fresh start must replay nothing)."""
        gens = [-1]
        for n in storage.list_dir(self.path(LOG_DIR), recursive=True):
            if m := _RECORD.match(n) or _LOG_SEGMENT.match(n):
                gens.append(int(m[1]))
        gens += [int(m[1]) for n in storage.list_dir(self.path(DECISIONS_DIR), recursive=True) if (m := _SEGMENT.match(n))]
        return max(gens) + 1

    def busy(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def write_base(self, st: dict[str, Any], arrays: dict[str, np.ndarray], lines: list[dict[str, Any]], wait: bool) -> None:
        """Write a base (st must hold `gen` and `ops`); in the background unless `wait`. One at a time:
        a base and the log deletions after it must not interleave with the next base."""
        self.wait()
        doomed = self._start_folder(int(st["gen"]), int(st["ops"]))
        if wait:
            self._write(st, arrays, lines, doomed, raise_errors=True)
            return
        self._writer = threading.Thread(target=self._write, args=(st, arrays, lines, doomed, False), daemon=True)
        self._writer.start()

    def _write(self, st: dict[str, Any], arrays: dict[str, np.ndarray], lines: list[dict[str, Any]],
               doomed: list[str], raise_errors: bool) -> None:
        gen, op = int(st["gen"]), int(st["ops"])
        lines, self._unwritten = self._unwritten + lines, []
        try:
            if lines:
                text = "".join(json.dumps(x) + "\n" for x in lines)
                try:
                    storage.write_text(self.path(DECISIONS_DIR, _name(gen, op) + ".jsonl"), text)
                except BaseException:
                    self._unwritten = lines + self._unwritten  # the next base carries them
                    raise
            arrays_file = f"arrays-{_name(gen, op)}.npz"
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            storage.write_bytes(self.path(arrays_file), buf.getvalue())
            storage.write_json(self.path(STATE_FILE), st | {"arrays_file": arrays_file}, indent=None)
            old, self._arrays_file = self._arrays_file, arrays_file
            # Only now is what the base holds garbage: the log folders older than its own.
            while doomed:
                storage.delete(self.path(LOG_DIR, doomed[0]))
                doomed.pop(0)
            if old and old != arrays_file:
                storage.delete(self.path(old))
        except BaseException as e:
            self._folders.extendleft(reversed(doomed))  # the next base deletes them
            self.last_error = e
            if raise_errors:
                raise
            log.warning("sampler checkpoint to %s failed (the log still holds every operation): %s", self.root, e)

    def tidy(self, gen: int, op: int) -> None:
        """After a restore: remove what a killed writer left behind (temp files, arrays files no base
        names, log records the base already holds, decisions of a base that was never written)."""
        keep = self._arrays_file
        for n in storage.list_dir(self.root):
            if ".partial-" in n or (_ARRAYS.match(n) and n != keep):
                storage.delete(self.path(n))
        for folder in {n.split("/")[0] for n in storage.list_dir(self.path(LOG_DIR), recursive=True)}:
            if folder != self._folder:
                storage.delete(self.path(LOG_DIR, folder))
        self._folders = deque()
        self.drop_stale_decisions(gen, op)

    def drop_stale_decisions(self, gen: int, op: int) -> None:
        """A decisions segment written for a base that never landed (killed before state.json): the
        replay regenerates those lines, so the segment would duplicate them."""
        for n in storage.list_dir(self.path(DECISIONS_DIR)):
            m = _SEGMENT.match(n)
            if ".partial-" in n or (m and int(m[1]) == gen and int(m[2]) > op):
                storage.delete(self.path(DECISIONS_DIR, n))


def read_decisions(sampler_dir: str) -> list[dict[str, Any]]:
    """Every decision line of a run's sampler, oldest first (`sampler_dir` = `<run_dir>/sampler`)."""
    out: list[dict[str, Any]] = []
    legacy = storage.join(sampler_dir, "decisions.jsonl")  # version-1 runs appended to one file
    if storage.exists(legacy):
        out += [x for _, x in storage.iter_jsonl(legacy)]
    for n in storage.list_dir(storage.join(sampler_dir, DECISIONS_DIR), suffix=".jsonl"):
        if _SEGMENT.match(n):
            out += [x for _, x in storage.iter_jsonl(storage.join(sampler_dir, DECISIONS_DIR, n))]
    return out
