"""eval stage: accuracy of a model or checkpoint on the paper's math benchmarks.

    saerl-ray eval --run-dir runs/m --eval.limit 20
    saerl-ray eval --run-dir runs/m --eval.model runs/m/train/model --eval.benchmarks '[math500, gsm8k]'

Greedy decoding with HF `generate`, batched with left padding, through the model's chat template; the
prompt is the run's `prompt` section (by default the user turn asks for the final answer in \\boxed{};
`saerl_ray.core.reward.format_messages`), and `math_reward` grades it. Writes `<run_dir>/eval/results.json` (per benchmark n / correct / accuracy,
plus the unweighted average over benchmarks, as the paper reports) and `eval/completions.jsonl`.

Why on the driver and not a Ray actor pool: on a CPU node torch already uses every core inside one
`generate` call, so extra actors only split the same cores; on GPUs, vLLM is the right tool.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from saerl_ray.core import storage
from saerl_ray.core.config import ANSWER_INSTRUCTION, RunConfig, UserError, fingerprint
from saerl_ray.core.data import find as find_data
from saerl_ray.core.data import stem_of
from saerl_ray.core.device import input_device
from saerl_ray.core.reward import (
    extract_answer,
    format_messages,
    gold_text,
    last_boxed,
    math_reward,
    prompt_style,
)
from saerl_ray.core.stage import Stage


class EvalDataError(UserError, ValueError):
    """A benchmark file is missing or a row lacks the field we need; the message names file/row/field."""


@dataclass(frozen=True)
class Benchmark:
    file: str
    prompt_fields: tuple[str, ...]
    answer: Callable[[dict], str | None]


def _field(name: str) -> Callable[[dict], str | None]:
    def get(row: dict) -> str | None:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # AMC stores 27.0: the gold is the integer when the float is integral.
            return str(int(value)) if float(value).is_integer() else str(value)
        return value

    return get


def _list_answer(row: dict) -> str | None:
    value = row.get("final_answer")
    return ", ".join(str(v) for v in value) if isinstance(value, list) else value


def _boxed_solution(row: dict) -> str | None:
    return last_boxed(row.get("solution") or "")


# Field names differ per file (inspected in ../shared/data): prompt candidates in order, answer getter.
BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math500.jsonl", ("problem",), _field("answer")),
    "gsm8k": Benchmark("gsm8k_test.jsonl", ("question",), _field("answer")),
    "aime24": Benchmark("aime24.jsonl", ("problem", "question"), _field("answer")),
    "amc23": Benchmark("amc23.jsonl", ("problem", "question"), _field("answer")),
    "minerva": Benchmark("minerva_math.jsonl", ("problem",), _boxed_solution),
    "olympiadbench": Benchmark("olympiadbench.jsonl", ("question",), _list_answer),
}


def load_benchmark(data_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    """Rows {row, prompt, answer} of one benchmark, in file order (the first `limit`)."""
    if name not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    path = find_data(str(data_dir), stem_of(spec.file))
    if path is None:
        raise EvalDataError(f"benchmark {name}: {data_dir} holds no {spec.file} (or .gz); set --eval.data_dir or "
                            "SAERL_DATA to a folder that has it (data/README.md says where each set comes from)")
    rows = []
    try:
        records = list(storage.iter_jsonl(path))
    except ValueError as e:
        raise EvalDataError(str(e)) from None
    for i, record in records:
        if limit is not None and len(rows) >= limit:
            break
        prompt = next((record[k] for k in spec.prompt_fields if record.get(k)), None)
        if not isinstance(prompt, str):
            raise EvalDataError(f"{path} row {i}: no text in field(s) {list(spec.prompt_fields)}")
        answer = spec.answer(record)
        if not answer or not str(answer).strip():
            raise EvalDataError(f"{path} row {i}: no gold answer for benchmark {name}")
        rows.append({"row": i, "prompt": prompt, "answer": gold_text(str(answer))})
    return rows


def render_prompts(tokenizer, problems: list[str], instruction: str = ANSWER_INSTRUCTION,
                   system: str | None = None) -> list[str]:
    """Problems as the policy sees them: the chat template when the tokenizer has one, else plain text."""
    chats = [format_messages(p, instruction, system) for p in problems]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return ["\n".join(m["content"] for m in c) + "\n" for c in chats]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    num_return_sequences: int = 1,
    temperature: float = 0.0,
    desc: str = "generate",
) -> list[list[str]]:
    """Completions per rendered prompt (greedy when temperature == 0), in input order.

    Prompts are grouped by length so a batch pads little; left padding keeps every prompt flush with
    its generated tokens."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[str]] = [[] for _ in prompts]
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences, do_sample=sampling)
    if sampling:  # plain temperature sampling: no top-k/top-p truncation from the model's defaults
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(input_device(model))
        gen = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **kwargs)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = texts[j * num_return_sequences : (j + 1) * num_return_sequences]
    return out


def evaluate_benchmark(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int, name: str,
                       style: dict | None = None) -> list[dict]:
    """Greedy completions for the rows, graded: one record per row (`style`: `reward.prompt_style`)."""
    prompts = render_prompts(tokenizer, [r["prompt"] for r in rows], **(style or {}))
    completions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc=name)
    return [
        {
            "benchmark": name,
            "row": r["row"],
            "answer": r["answer"],
            "extracted": extract_answer(c[0]),
            "reward": math_reward(c[0], r["answer"]),
            "completion": c[0],
        }
        for r, c in zip(rows, completions)
    ]


def summarise(records: list[dict], benchmarks: list[str]) -> dict:
    per = {}
    for name in benchmarks:
        rs = [r["reward"] for r in records if r["benchmark"] == name]
        per[name] = {"n": len(rs), "correct": int(sum(rs)), "accuracy": (sum(rs) / len(rs)) if rs else 0.0}
    average = sum(v["accuracy"] for v in per.values()) / len(per) if per else 0.0
    return {"benchmarks": per, "average": average}


def print_table(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("benchmark", "n", "correct", "accuracy"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    for name, v in results["benchmarks"].items():
        table.add_row(name, str(v["n"]), str(v["correct"]), f"{100 * v['accuracy']:.1f}%")
    table.add_row("average", "", "", f"{100 * results['average']:.1f}%", style="bold")
    Console().print(table)


def _model_stamp(path: str) -> float | None:
    # A retrained checkpoint at the same path must not reuse old results: hash its weights' mtime.
    p = Path(path)
    files = list(p.glob("*.safetensors")) + list(p.glob("*.bin")) if p.is_dir() else []
    return max((f.stat().st_mtime for f in files), default=None)


def run(cfg: RunConfig) -> dict:
    from saerl_ray.core.models import load_for_generation, load_tokenizer, resolve

    name = cfg.eval.model or cfg.model.name
    path = resolve(name)
    st = Stage(cfg.run_dir, "eval", fingerprint(cfg.eval, cfg.model, cfg.prompt, path, _model_stamp(path)))
    if st.done():
        return st.summary()
    for b in cfg.eval.benchmarks:  # fail on a bad benchmark name/file before loading the model
        load_benchmark(cfg.eval.data_dir, b, limit=1)
    tmp = st.begin(keep_partial=False)
    t0 = time.time()
    tok = load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)
    # bf16 on the driver's GPU(s) when it holds any, model.dtype on CPU.
    model = load_for_generation(name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    records: list[dict] = []
    for b in cfg.eval.benchmarks:
        rows = load_benchmark(cfg.eval.data_dir, b, cfg.eval.limit)
        records += evaluate_benchmark(model, tok, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size, b,
                                      prompt_style(cfg.prompt))
    results = {"model": name, **summarise(records, cfg.eval.benchmarks), "seconds": time.time() - t0}
    storage.write_text(storage.join(tmp, "completions.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    storage.write_json(storage.join(tmp, "results.json"), results)
    st.commit(results)
    print_table(results, f"eval: {os.path.basename(str(name).rstrip('/'))}")
    print(
        f"[eval] {len(records)} problems on {len(cfg.eval.benchmarks)} benchmarks: "
        f"average accuracy {100 * results['average']:.1f}% in {results['seconds']:.0f}s"
    )
    return results
