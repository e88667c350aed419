import json

import pyarrow.parquet as pq
import pytest

from saerl_ray.cli import main as cli_main
from saerl_ray.core.config import InputSpec
from saerl_ray.stages.ingest import IngestError, ingest, last_boxed, prompt_id


def _write_bad_math_file(path, shared_data):
    good = [json.loads(l) for l in (shared_data / "math500.jsonl").read_text().splitlines()[:20]]
    lines = [json.dumps(r) for r in good]
    bad = {
        3: "{not json",
        5: json.dumps({"problem": "", "answer": "1", "level": 1}),
        7: json.dumps({"answer": "3", "level": 2}),
        9: json.dumps({"problem": 42, "answer": "3"}),
        11: json.dumps({"problem": "What is x?", "answer": "1", "level": "hard"}),
        13: json.dumps(good[0]),  # duplicate of row 0
        15: json.dumps(["a", "list"]),
    }
    for i, line in bad.items():
        lines.insert(i, line)
    data = "\n".join(lines).encode() + b"\n" + b'{"problem": "caf\xe9 \xff", "answer": "1"}\n'
    path.write_bytes(data)
    return len(lines) + 1, len(bad) + 1


def test_bad_rows_are_rejected_with_reasons_and_counts_reconcile(tmp_path, shared_data):
    f = tmp_path / "mixed.jsonl"
    n_rows, n_bad = _write_bad_math_file(f, shared_data)
    rc = cli_main(["ingest", "--preset", "math", "--input", str(f), "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    prompts = pq.read_table(tmp_path / "run/ingest/prompts.parquet")
    rejected = pq.read_table(tmp_path / "run/ingest/rejected.parquet").to_pylist()
    assert prompts.num_rows + len(rejected) == n_rows
    assert len(rejected) == n_bad
    reasons = {r["row"]: r["reason"] for r in rejected}
    assert reasons[3].startswith("bad_json")
    assert reasons[5] == "empty_prompt"
    assert reasons[7].startswith("missing_prompt")
    assert reasons[9].startswith("wrong_type:problem")
    assert reasons[11].startswith("wrong_type:difficulty")
    assert reasons[13].startswith("duplicate_of:")
    assert reasons[15].startswith("not_an_object")
    assert reasons[n_rows - 1].startswith("undecodable")
    assert all(r["raw"] for r in rejected)  # the raw row is kept, nothing lost
    summary = json.loads((tmp_path / "run/ingest/summary.json").read_text())
    assert summary["rows"] == n_rows and summary["accepted"] == prompts.num_rows


def test_unreadable_file_error_names_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(IngestError, match="nope.jsonl"):
        ingest([InputSpec(path=str(missing), preset="math")])
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(IngestError, match="broken.parquet"):
        ingest([InputSpec(path=str(bad_parquet), preset="math")])


@pytest.mark.parametrize(
    "preset,file,field_checks",
    [
        ("gsm8k", "gsm8k_train.jsonl", lambda r: r["answer"].lstrip("-").replace(".", "").isdigit()),
        ("math", "math500.jsonl", lambda r: 1 <= r["difficulty"] <= 5 and r["topic"]),
        ("olympiadbench", "olympiadbench.jsonl", lambda r: r["answer"] and not r["answer"].startswith("[")),
        ("aime", "aime24.jsonl", lambda r: r["answer"].isdigit()),
        ("minerva", "minerva_math.jsonl", lambda r: r["answer"] and "boxed" not in r["answer"]),
    ],
)
def test_presets_map_real_files(preset, file, field_checks, require_data):
    shared_data = require_data(file)
    accepted, rejected, counts = ingest([InputSpec(path=str(shared_data / file), preset=preset, limit=50)])
    n = counts[str(shared_data / file)]["rows"]
    assert n == min(50, len((shared_data / file).read_text().splitlines()))
    assert len(accepted) >= 0.9 * n
    assert all(field_checks(r) for r in accepted)


def test_gsm8k_answer_without_marker_is_rejected(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n"
                 + json.dumps({"question": "2+2?", "answer": "so\n#### 4"}) + "\n")
    accepted, rejected, _ = ingest([InputSpec(path=str(f), preset="gsm8k")])
    assert [r["answer"] for r in accepted] == ["4"]
    assert rejected[0]["reason"].startswith("bad_answer")


def test_ids_are_stable_and_whitespace_insensitive():
    assert prompt_id("What is  1+1?\n") == prompt_id("What is 1+1?")
    assert prompt_id("What is 1+1?") != prompt_id("What is 1+2?")


def test_parquet_and_hf_saved_inputs(tmp_path):
    import datasets

    rows = [{"question": f"q{i}?", "final_answer": str(i), "difficulty": 5.5, "topic": "Algebra"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    a1, _, _ = ingest([InputSpec(path=str(tmp_path / "hf"), preset="deepmath")])
    a2, _, _ = ingest([InputSpec(path=str(tmp_path / "d.parquet"), preset="deepmath")])
    assert [r["id"] for r in a1] == [r["id"] for r in a2] and len(a1) == 5
    assert a1[0]["difficulty"] == 5.5 and a1[0]["topic"] == "Algebra"


def test_last_boxed_is_brace_balanced():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed("no box") is None


def test_rerun_is_a_noop_and_changed_config_recomputes(tmp_path, require_data):
    shared_data = require_data("aime24.jsonl")
    args = ["ingest", "--preset", "aime", "--input", str(shared_data / "aime24.jsonl"), "--run-dir", str(tmp_path)]
    cli_main(args)
    marker = tmp_path / "ingest/_DONE.json"
    first = marker.read_text()
    cli_main(args)
    assert marker.read_text() == first
    cli_main(args + ["--ingest.max_chars", "300"])
    assert marker.read_text() != first
    assert pq.read_table(tmp_path / "ingest/rejected.parquet").num_rows > 0


def test_a_copied_or_touched_input_is_the_same_input_an_edited_one_is_not(tmp_path, require_data):
    """Inputs are fingerprinted by content: re-mounting the data (new mtimes) must not redo every stage."""
    shared_data = require_data("aime24.jsonl")
    import os

    data = tmp_path / "aime.jsonl"
    data.write_bytes((shared_data / "aime24.jsonl").read_bytes())
    args = ["ingest", "--preset", "aime", "--input", str(data), "--run-dir", str(tmp_path / "run")]
    cli_main(args)
    marker = tmp_path / "run/ingest/_DONE.json"
    first = marker.read_text()
    os.utime(data, (1_000_000_000, 1_000_000_000))  # a fresh mount or copy: same bytes, another mtime
    cli_main(args)
    assert marker.read_text() == first
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one row fewer: a different input
    cli_main(args)
    assert marker.read_text() != first
    assert pq.read_table(tmp_path / "run/ingest/prompts.parquet").num_rows == len(lines) - 1
