"""The statistics `benchmarks/curriculum_rl.py` reports: what its JSON line claims rests on them."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "curriculum_rl", Path(__file__).resolve().parents[1] / "benchmarks" / "curriculum_rl.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def run(*accs: float, every: int = 10) -> dict:
    return {"curve": [(i * every, a) for i, a in enumerate(accs)]}


def test_auc_is_the_trapezoid_mean_accuracy_over_the_run():
    assert bench.auc([(0, 0.0), (10, 1.0)]) == pytest.approx(0.5)
    assert bench.auc([(0, 0.2), (10, 0.2), (30, 0.6)]) == pytest.approx((10 * 0.2 + 20 * 0.4) / 30)


def test_ci95_is_the_student_t_interval():
    m, ci = bench.mean_ci95([0.0, 1.0])
    assert m == 0.5 and ci == pytest.approx([0.5 - 12.7062 * 0.5, 0.5 + 12.7062 * 0.5], rel=1e-4)
    assert bench.mean_ci95([0.3]) == (0.3, None)


def test_arms_are_compared_on_the_seeds_both_finished_and_paired_by_seed():
    runs = {
        "shuffled": {0: run(0.1, 0.2, 0.3), 1: run(0.1, 0.1, 0.1), 2: run(0.1, 0.5, 0.5)},
        "saerl": {0: run(0.1, 0.3, 0.4), 1: run(0.1, 0.2, 0.2)},  # seed 2 unfinished
    }
    line = bench.summarise(runs, steps=20, eval_every=10)
    assert line["seeds"] == 2 and line["seed_list"] == [0, 1]
    assert line["target_accuracy"] == pytest.approx(0.2)  # shuffled's mean final over seeds 0 and 1
    diff = line["paired"]["saerl - shuffled"]["final_accuracy"]
    assert diff["per_seed"] == pytest.approx([0.1, 0.1]) and diff["mean"] == pytest.approx(0.1)
    s = line["arms"]["saerl"]
    assert s["steps_to_target"] == [10, 10] and s["reached"] == 2
    # a run that never reaches the target counts as censored at steps + eval_every
    assert line["arms"]["shuffled"]["steps_to_target"] == [10, None]
    assert line["arms"]["shuffled"]["steps_to_target_mean"] == pytest.approx(20.0)


def test_the_proxy_share_is_saerl_minus_the_same_plan_ordered_by_length():
    runs = {
        "shuffled": {0: run(0.1, 0.2), 1: run(0.1, 0.2)},
        "saerl": {0: run(0.1, 0.5), 1: run(0.1, 0.3)},
        "length_difficulty": {0: run(0.1, 0.4), 1: run(0.1, 0.4)},
    }
    line = bench.summarise(runs, steps=10, eval_every=10)
    assert set(line["paired"]) == {"saerl - shuffled", "length_difficulty - shuffled", "saerl - length_difficulty"}
    share = line["paired"]["saerl - length_difficulty"]["final_accuracy"]
    assert share["per_seed"] == pytest.approx([0.1, -0.1]) and share["mean"] == pytest.approx(0.0)


def test_without_a_finished_baseline_nothing_is_claimed():
    assert bench.summarise({"saerl": {0: run(0.1, 0.2)}}, steps=10, eval_every=10) == {"seeds": 0}


def test_answer_nll_is_the_answer_tokens_cross_entropy_after_the_rendered_prompt(tiny_model_dir):
    """The likelihood label against HF's own loss on the same tokens (prompt positions masked out)."""
    from types import SimpleNamespace

    import torch

    from saerl_ray.core.models import load_for_generation, load_tokenizer
    from saerl_ray.stages.evaluate import render_prompts

    args = SimpleNamespace(model=str(tiny_model_dir), instruction="", system=None)
    pairs = [("What is 48 / 2?", "24"), ("What is 7 + 5?", "12")]
    got = bench.answer_nll(pairs, args)
    tok, model = load_tokenizer(args.model), load_for_generation(args.model, dtype="float32").eval()
    for (question, gold), nll in zip(pairs, got):
        prompt = tok(render_prompts(tok, [question], instruction="", system=None)[0])["input_ids"]
        answer = tok(gold, add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            loss = model(x, labels=labels).loss.item()
        assert nll == pytest.approx(loss * len(answer), rel=1e-4) and nll > 0


def test_likelihood_labels_are_computed_once_per_model_and_prompt_style(tmp_path, monkeypatch):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(bench, "answer_nll", lambda pairs, args: calls.append(list(pairs)) or [float(len(q)) for q, _ in pairs])
    args = SimpleNamespace(model="m", instruction="", system=None)
    rows = [{"question": "What is 1 + 2?", "answer": "#### 3"}, {"question": "What is 10 * 2?", "answer": "#### 20"}]
    first = bench.cached_answer_nll(tmp_path, rows, args)
    more = rows + [{"question": "What is 9 - 4?", "answer": "#### 5"}]
    assert bench.cached_answer_nll(tmp_path, more, args)[:2] == first
    assert calls == [[("What is 1 + 2?", "3"), ("What is 10 * 2?", "20")], [("What is 9 - 4?", "5")]]
    bench.cached_answer_nll(tmp_path, rows, SimpleNamespace(model="other", instruction="", system=None))
    assert len(calls) == 3 and len(calls[-1]) == 2  # another policy: its own labels
