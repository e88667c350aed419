"""ingest stage: raw prompt files -> `ingest/prompts.parquet` + `ingest/rejected.parquet`.

    saerl-ray ingest --preset math --input data/math500.jsonl.gz --run-dir runs/m
    saerl-ray ingest --config configs/gsm8k_math500.yaml

Inputs are jsonl / json / parquet files, directories of them, or an HF `save_to_disk` dir, on a local
path or an object-store URI (anything pyarrow.fs understands). Nothing is lost: every input row is
either accepted or kept in `rejected` with its reason, and the counts reconcile per file.

Why the driver and not Ray Data: deduplication and exact per-row accounting need one global pass,
and jsonl must be split by line before parsing so one bad line rejects one row instead of failing
the read. At DeepMath-103K scale this is a few seconds of pyarrow work; the model stages are where
Ray pays off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from saerl_ray.core import storage
from saerl_ray.core.config import InputSpec, RunConfig, UserError, fingerprint
from saerl_ray.core.data import expand as expand_data
from saerl_ray.core.data import stem_of
from saerl_ray.core.reward import last_boxed
from saerl_ray.core.stage import Stage

# Our field -> candidate source columns (first present wins). `answer_from` post-processes answers.
PRESETS: dict[str, dict[str, Any]] = {
    "deepmath": {"prompt": ["question"], "answer": ["final_answer"], "difficulty": ["difficulty"], "topic": ["topic"]},
    "math": {"prompt": ["problem"], "answer": ["answer"], "difficulty": ["level"], "topic": ["subject", "type"]},
    "gsm8k": {"prompt": ["question"], "answer": ["answer"], "answer_from": "gsm8k"},
    "olympiadbench": {"prompt": ["question"], "answer": ["final_answer"], "topic": ["subfield"], "answer_from": "list_text"},
    "aime": {"prompt": ["problem"], "answer": ["answer"]},
    "amc": {"prompt": ["problem", "question"], "answer": ["answer"]},
    "minerva": {"prompt": ["problem"], "answer": ["answer", "solution"], "topic": ["type"], "answer_from": "boxed"},
    "none": {"prompt": ["prompt"], "answer": ["answer"], "difficulty": ["difficulty"], "topic": ["topic"], "quality": ["quality"]},
}
FIELDS = ("prompt", "answer", "difficulty", "topic", "quality")

PROMPT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()), ("source", pa.string()),
    ("split", pa.string()), ("row", pa.int64()), ("difficulty", pa.float64()), ("topic", pa.string()),
    ("quality", pa.float64()), ("n_chars", pa.int32()),
])
REJECT_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int64()), ("source", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
])


class IngestError(UserError, RuntimeError):
    """An input cannot be read at all (missing, unreadable, unknown format); names the file."""


class RowError(ValueError):
    """One row is malformed; the message becomes its `reason` in `rejected`."""


@dataclass
class RawRow:
    file: str
    row: int
    record: Any  # parsed object, or None when `error` is set
    raw: str
    error: str | None = None


# ---------------------------------------------------------------- reading


# Gzipped text files are read through pyarrow's compression detection (by extension).
READABLE = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".arrow")


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return storage.filesystem(path)
    except Exception as e:  # pyarrow raises several types for bad URIs / missing credentials
        raise IngestError(f"cannot open input {path}: {e}") from e


def _hub_error(path: str, e: Exception) -> IngestError:
    """One line for a hub path that cannot be read: offline, or no network, or no such dataset."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        why = "the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1)"
    else:
        why = f"the Hugging Face hub did not answer ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return IngestError(f"input {path}: {why}; download it where a network exists and point the path at the "
                       "local copy (or a folder under SAERL_DATA)")


def _list_files(fs: pafs.FileSystem, path: str, shown: str) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise IngestError(f"input not found: {shown}")
    if info.type == pafs.FileType.File:
        return [path]
    files = [
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(READABLE)
    ]
    if not files:
        raise IngestError(f"input directory {shown} holds no {'/'.join(READABLE)} files")
    return sorted(files)


def _jsonl_rows(data: bytes, name: str) -> Iterator[RawRow]:
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first row
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines = lines[:-1]
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(name, i, None, line.decode("utf-8", "replace"), f"undecodable: {e.reason} at byte {e.start}")
            continue
        if not text.strip():
            yield RawRow(name, i, None, text, "blank_line")
            continue
        try:
            yield RawRow(name, i, json.loads(text), text)
        except json.JSONDecodeError as e:
            yield RawRow(name, i, None, text, f"bad_json: {e.msg} (col {e.colno})")


def _table_rows(table: pa.Table, name: str) -> Iterator[RawRow]:
    for i, rec in enumerate(table.to_pylist()):
        yield RawRow(name, i, rec, json.dumps(rec, default=str, ensure_ascii=False))


def read_rows(path: str) -> Iterator[RawRow]:
    """Every row of every file under `path`, parse failures included (as RawRow.error)."""
    if path.startswith("hf://"):
        try:
            yield from _read_rows(path)
        except IngestError:
            raise
        except Exception as e:  # huggingface_hub raises its own types for offline mode, 404s, timeouts
            raise _hub_error(path, e) from None
        return
    yield from _read_rows(path)


def _read_rows(path: str) -> Iterator[RawRow]:
    fs, p = _filesystem(path)
    if fs.get_file_info(f"{p}/dataset_info.json").type == pafs.FileType.File:
        yield from _hf_saved_rows(path)
        return
    for f in _list_files(fs, p, path):
        shown = f if "://" not in path else path.split("://")[0] + "://" + f
        try:
            if f.endswith(".parquet"):
                with fs.open_input_file(f) as fh:
                    yield from _table_rows(pq.read_table(fh), shown)
            elif f.endswith(".arrow"):
                with fs.open_input_file(f) as fh:
                    yield from _table_rows(pa.ipc.open_stream(fh).read_all(), shown)
            else:
                with fs.open_input_stream(f) as fh:
                    data = fh.read()
                if f.endswith((".json", ".json.gz")) and data.lstrip()[:1] == b"[":
                    try:
                        records = json.loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise IngestError(f"{shown}: not a valid JSON array ({e})") from e
                    for i, rec in enumerate(records):
                        yield RawRow(shown, i, rec, json.dumps(rec, ensure_ascii=False))
                else:
                    yield from _jsonl_rows(data, shown)
        except (OSError, pa.ArrowException) as e:
            raise IngestError(f"cannot read input file {shown}: {e}") from e


def _hf_saved_rows(path: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise IngestError(f"cannot read HF saved dataset {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise IngestError(f"{path} is a DatasetDict ({list(ds)}); point --input at one split's folder")
    yield from _table_rows(ds.data.table, path)


# ---------------------------------------------------------------- normalising


def _answer_post(kind: str | None, value: str) -> str:
    if kind == "gsm8k":
        if "####" not in value:
            raise RowError("bad_answer: GSM8K answer has no '####' final answer")
        return value.rsplit("####", 1)[1].strip().replace(",", "")
    if kind == "list_text":
        # OlympiadBench renders a list of answers as text: "['$x=2$']" -> "x=2".
        v = value.strip()
        if v.startswith("[") and v.endswith("]"):
            try:
                items = json.loads(v.replace("'", '"')) if "\\" not in v else None
            except json.JSONDecodeError:
                items = None
            v = ", ".join(str(x) for x in items) if items else v[1:-1].strip().strip("'\"")
        return v.strip().strip("$").strip()
    if kind == "boxed":
        return last_boxed(value) or value.strip()
    return value.strip()


def _pick(record: dict, candidates: list[str]) -> tuple[str | None, Any]:
    for c in candidates:
        if c in record and record[c] is not None:
            return c, record[c]
    return None, None


def _as_float(field: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RowError(f"wrong_type:{field} (bool)")
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        m = re.search(r"-?\d+(\.\d+)?", value)  # "Level 3" -> 3
        if not m:
            raise RowError(f"wrong_type:{field} (non-numeric string {value[:40]!r})")
        f = float(m.group())
    else:
        raise RowError(f"wrong_type:{field} ({type(value).__name__})")
    if math.isnan(f) or math.isinf(f):
        raise RowError(f"wrong_type:{field} (not finite)")
    return f


def reason_kind(reason: str) -> str:
    """`duplicate_of:ab12 (f.jsonl:3)` -> `duplicate_of`: the key counts are grouped by."""
    return re.split(r"[: ]", reason, maxsplit=1)[0]


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(normalise_text(prompt).encode()).hexdigest()[:16]


def normalise_record(record: Any, spec: InputSpec, max_chars: int, require_answer: bool = False) -> dict[str, Any]:
    """One raw record -> our row (without id/source/split/row). Raises RowError with the reason."""
    if not isinstance(record, dict):
        raise RowError(f"not_an_object ({type(record).__name__})")
    preset = PRESETS.get(spec.preset)
    if preset is None:
        raise IngestError(f"unknown preset {spec.preset!r} for {spec.path}; known: {sorted(PRESETS)}")
    mapping = {f: ([spec.columns[f]] if f in spec.columns else preset.get(f, [])) for f in FIELDS}
    col, prompt = _pick(record, mapping["prompt"])
    if col is None:
        raise RowError(f"missing_prompt (no column among {mapping['prompt']})")
    if not isinstance(prompt, str):
        raise RowError(f"wrong_type:{col} ({type(prompt).__name__}, expected string)")
    if not prompt.strip():
        raise RowError("empty_prompt")
    if len(prompt) > max_chars:
        raise RowError(f"too_long ({len(prompt)} chars > {max_chars})")
    acol, answer = _pick(record, mapping["answer"])
    if isinstance(answer, (list, tuple)):
        answer = ", ".join(str(a) for a in answer)
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif answer is not None and not isinstance(answer, str):
        raise RowError(f"wrong_type:{acol} ({type(answer).__name__})")
    answer = _answer_post(preset.get("answer_from"), answer) if answer else ""
    if require_answer and not answer.strip():
        raise RowError(f"missing_answer (no value in {mapping['answer'] or 'any answer column'})")
    _, topic = _pick(record, mapping["topic"])
    return {
        "prompt": prompt.strip(),
        "answer": answer,
        "difficulty": _as_float("difficulty", _pick(record, mapping["difficulty"])[1]),
        "topic": None if topic is None else str(topic),
        "quality": _as_float("quality", _pick(record, mapping["quality"])[1]),
    }


# ---------------------------------------------------------------- stage


def input_path(spec: InputSpec) -> str:
    """The input's path with ${SAERL_DATA} expanded (core/data.py)."""
    try:
        return expand_data(spec.path)
    except FileNotFoundError as e:
        raise IngestError(f"ingest input {spec.path}: {e}") from None


def input_versions(inputs: list[InputSpec]) -> list[list]:
    """Inputs as a fingerprint sees them: path + content (storage.version_of), so an edited file counts as
    new data and a re-mounted copy of the same data does not redo every stage. A folder or a missing file
    is recorded by path alone (reading it says which)."""
    out = []
    for spec in inputs:
        try:
            out.append([spec.path, *storage.version_of(input_path(spec))])
        except (FileNotFoundError, IsADirectoryError, OSError):
            out.append([spec.path])
    return out


def ingest(inputs: list[InputSpec], dedup: bool = True, max_chars: int = 8000, require_answer: bool = False):
    """Pure core: returns (accepted rows, rejected rows, per-input counts)."""
    accepted: list[dict] = []
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    counts: dict[str, dict] = {}
    for spec in inputs:
        path = input_path(spec)
        source = spec.source or stem_of(path.rstrip("/"))
        c = {"rows": 0, "accepted": 0, "rejected": 0, "by_reason": Counter()}
        for raw in read_rows(path):
            if spec.limit is not None and c["rows"] >= spec.limit:
                break
            c["rows"] += 1
            reason = raw.error
            row = None
            if reason is None:
                try:
                    row = normalise_record(raw.record, spec, max_chars, require_answer)
                except RowError as e:
                    reason = str(e)
            if row is not None:
                pid = prompt_id(row["prompt"])
                if dedup and pid in seen:
                    reason = f"duplicate_of:{pid} ({seen[pid]})"
                else:
                    seen[pid] = f"{raw.file}:{raw.row}"
                    accepted.append({"id": pid, **row, "source": source, "split": spec.split, "row": raw.row,
                                     "n_chars": len(row["prompt"])})
                    c["accepted"] += 1
                    continue
            rejected.append({"file": raw.file, "row": raw.row, "source": source, "reason": reason, "raw": raw.raw})
            c["rejected"] += 1
            c["by_reason"][reason_kind(reason)] += 1
        c["by_reason"] = dict(c["by_reason"])
        assert c["accepted"] + c["rejected"] == c["rows"], f"counts do not reconcile for {path}"
        counts[path] = c
    return accepted, rejected, counts


def run(cfg: RunConfig) -> dict:
    if not cfg.ingest.inputs:
        raise IngestError("no inputs: set ingest.inputs in the config or pass --input FILE --preset NAME")
    st = Stage(cfg.run_dir, "ingest", fingerprint(cfg.ingest, input_versions(cfg.ingest.inputs)))
    if st.done():
        return st.summary()
    tmp = st.begin(keep_partial=False)
    ic = cfg.ingest
    accepted, rejected, counts = ingest(ic.inputs, ic.dedup, ic.max_chars, ic.require_answer)
    if not rejected and not accepted:
        raise IngestError(f"no rows in {', '.join(s.path for s in ic.inputs)}: the input is empty")
    if not accepted:
        raise IngestError(f"every row was rejected ({len(rejected)} rows); see reasons: "
                          f"{Counter(reason_kind(r['reason']) for r in rejected).most_common(3)}")
    storage.write_parquet(pa.Table.from_pylist(accepted, schema=PROMPT_SCHEMA), storage.join(tmp, "prompts.parquet"))
    storage.write_parquet(pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA), storage.join(tmp, "rejected.parquet"))
    total = {k: sum(c[k] for c in counts.values()) for k in ("rows", "accepted", "rejected")}
    summary = {"inputs": counts, **total}
    st.commit(summary)
    print(f"[ingest] {total['rows']} rows -> {total['accepted']} accepted + {total['rejected']} rejected "
          f"({', '.join(f'{k}={v}' for c in counts.values() for k, v in c['by_reason'].items()) or 'no rejects'})"
          f" -> {st.out}")
    return summary
