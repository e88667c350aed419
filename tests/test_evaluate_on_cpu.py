import json

import pytest

from saerl_ray.cli import main as cli_main
from saerl_ray.core.reward import math_reward
from saerl_ray.stages.evaluate import (
    BENCHMARKS,
    EvalDataError,
    generate,
    load_benchmark,
    render_prompts,
)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_file_yields_prompts_and_gradable_gold(require_data, name):
    shared_data = require_data(BENCHMARKS[name].file)
    rows = load_benchmark(shared_data, name)
    assert len(rows) >= 30
    assert [r["row"] for r in rows] == sorted(r["row"] for r in rows)
    for r in rows[:25]:
        assert r["prompt"].strip() and r["answer"].strip()
        # The gold itself, boxed, must be graded correct: proves the answer field was read right.
        assert math_reward(f"\\boxed{{{r['answer']}}}", r["answer"]) == 1.0, (name, r["row"], r["answer"])


def test_minerva_gold_comes_from_the_solutions_last_box(require_data):
    shared_data = require_data("minerva_math.jsonl")
    first = json.loads((shared_data / "minerva_math.jsonl").read_text().splitlines()[0])
    row = load_benchmark(shared_data, "minerva", limit=1)[0]
    assert row["answer"] in first["solution"]
    assert first["solution"].rstrip().rfind("\\boxed{" + row["answer"]) > 0


def test_bad_benchmark_file_names_the_row(tmp_path):
    (tmp_path / "math500.jsonl").write_text(
        json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n"
    )
    with pytest.raises(EvalDataError, match=r"math500.jsonl row 1: no gold answer"):
        load_benchmark(tmp_path, "math500")
    with pytest.raises(EvalDataError, match="unknown benchmark 'mathx'"):
        load_benchmark(tmp_path, "mathx")


def test_batched_left_padded_generation_matches_one_by_one(tiny_model_dir):
    from saerl_ray.core.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    prompts = render_prompts(tok, ["What is 1+1?", "A much longer problem statement about 17 apples.", "x?"])
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(c) == 1 for c in batched)
    sampled = generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, num_return_sequences=3, temperature=1.0)
    assert [len(c) for c in sampled] == [3, 3]


def test_eval_stage_end_to_end_on_tiny_model(tmp_path, tiny_model_dir, require_data, capsys):
    shared_data = require_data(*(b.file for b in BENCHMARKS.values()))  # eval's default: every benchmark
    run_dir = tmp_path / "run"
    args = [
        "eval", "--run-dir", str(run_dir), "--eval.model", str(tiny_model_dir), "--limit", "2",
        "--eval.max_new_tokens", "4", "--eval.data_dir", str(shared_data),
    ]
    assert cli_main(args) == 0
    results = json.loads((run_dir / "eval/results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    completions = [json.loads(l) for l in (run_dir / "eval/completions.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * len(BENCHMARKS)
    for name, v in results["benchmarks"].items():
        mine = [c for c in completions if c["benchmark"] == name]
        # the summary counts exactly the graded completions of that benchmark, first two rows in file order
        assert [c["row"] for c in mine] == [0, 1]
        assert v["n"] == 2 and v["correct"] == sum(c["reward"] == 1.0 for c in mine)
        assert v["accuracy"] == v["correct"] / 2
    accs = [v["accuracy"] for v in results["benchmarks"].values()]
    assert results["average"] == pytest.approx(sum(accs) / len(accs))
    assert "average" in capsys.readouterr().out
    # Same config, same model: a no-op that returns the committed summary.
    stamp = (run_dir / "eval/_DONE.json").read_text()
    assert cli_main(args) == 0
    assert (run_dir / "eval/_DONE.json").read_text() == stamp


def test_prompt_section_reaches_the_rendered_prompt():
    from testkit import tiny_tokenizer

    from saerl_ray.core.config import ANSWER_INSTRUCTION, load_config
    from saerl_ray.core.reward import prompt_style

    tok = tiny_tokenizer()
    default = render_prompts(tok, ["What is 1+1?"])[0]
    assert "What is 1+1?\n" + ANSWER_INSTRUCTION in default
    cfg = load_config(None, {"prompt.system": "Answer with the number only.", "prompt.instruction": ""})
    short = render_prompts(tok, ["What is 1+1?"], **prompt_style(cfg.prompt))[0]
    assert "Answer with the number only." in short and ANSWER_INSTRUCTION not in short
    assert short.index("Answer with the number only.") < short.index("What is 1+1?")
    tok.chat_template = None  # no template: plain text, system line first
    assert render_prompts(tok, ["x?"], **prompt_style(cfg.prompt)) == ["Answer with the number only.\nx?\n"]
