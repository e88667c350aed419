"""What a new user sees on bad input: one `error:` line naming the file/field/row, exit 2, no traceback."""

import json

import pyarrow.parquet as pq
import pytest

from saerl_ray.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def assert_one_error_line(rc, err, *needles):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_input_file(tmp_path, capsys):
    rc, err = run_cli(capsys, "ingest", "--input", str(tmp_path / "missing.jsonl"), "--preset", "math",
                      "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(rc, err, "input not found", "missing.jsonl")


def test_empty_input_file_says_it_is_empty(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    rc, err = run_cli(capsys, "ingest", "--input", str(tmp_path / "empty.jsonl"), "--preset", "math",
                      "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(rc, err, "empty.jsonl", "empty")


def test_bad_config_field(tmp_path, capsys):
    rc, err = run_cli(capsys, "plan", "--run-dir", str(tmp_path), "--plan.batch_size", "many")
    assert rc == 2 and "plan.batch_size" in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    rc, err = run_cli(capsys, "plan", "-c", str(tmp_path / "nope.yaml"))
    assert_one_error_line(rc, err, "nope.yaml")


def test_missing_stage_output_names_the_command(tmp_path, capsys):
    rc, err = run_cli(capsys, "features", "--run-dir", str(tmp_path / "run"))
    assert_one_error_line(rc, err, "stage 'ingest' has not finished", "saerl-ray ingest")


def test_missing_packaged_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAERL_CACHE", str(tmp_path / "empty-cache"))
    rc, err = run_cli(capsys, "eval", "--run-dir", str(tmp_path / "run"), "--eval.data_dir", str(tmp_path))
    assert_one_error_line(rc, err, "saerl-ray models pull smollm2")


def test_unreachable_ray_address_fails_fast_with_its_name():
    import subprocess
    import sys

    # A fresh process: in this one another test may have started Ray already, and init_ray is idempotent.
    code = ("from saerl_ray.core.config import RayConfig\nfrom saerl_ray.core.ray_init import RayUnreachable, init_ray\n"
            "try:\n    init_ray(RayConfig(address='127.0.0.1:9', connect_timeout_s=1))\n"
            "except RayUnreachable as e:\n    print(e)\n    raise SystemExit(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "127.0.0.1:9 did not answer within 1s" in out.stdout


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["features", "--run-dir", str(tmp_path / "run"), "--debug"])


def test_bom_keeps_first_row_and_null_answer_is_rejected(tmp_path, capsys):
    rows = [{"problem": "What is 2+2?", "answer": "4"}, {"problem": "What is 3+3?", "answer": None},
            {"problem": "What is 5+5?", "answer": ""}, {"problem": "What is 7+7?", "answer": "14"}]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    assert main(["ingest", "--input", str(tmp_path / "bom.jsonl"), "--preset", "math", "--run-dir", str(tmp_path / "r")]) == 0
    kept = pq.read_table(tmp_path / "r/ingest/prompts.parquet").column("prompt").to_pylist()
    rejected = pq.read_table(tmp_path / "r/ingest/rejected.parquet").to_pylist()
    assert kept == ["What is 2+2?", "What is 7+7?"]
    assert [r["row"] for r in rejected] == [1, 2] and all(r["reason"].startswith("missing_answer") for r in rejected)
    # label-free uses keep them
    assert main(["ingest", "--input", str(tmp_path / "bom.jsonl"), "--preset", "math", "--run-dir", str(tmp_path / "r2"),
                 "--ingest.require_answer", "false"]) == 0
    assert pq.read_table(tmp_path / "r2/ingest/prompts.parquet").num_rows == 4


def test_extra_args_with_the_trl_backend_are_refused_not_ignored(tmp_path, capsys):
    rc, err = run_cli(capsys, "train", "--run-dir", str(tmp_path), "--train.extra_args", '["--rollout.temperature", "0.9"]')
    assert rc == 2 and "train.extra_args" in err and "trl backend takes none" in err and "Traceback" not in err
    rc, err = run_cli(capsys, "train", "--run-dir", str(tmp_path), "--train.backend", "openrlhf",
                      "--train.extra_args", '["--rollout.temperature", "0.9"]')
    assert rc == 2 and "train.extra_args" not in err, err  # accepted; it stops later, on the missing plan
