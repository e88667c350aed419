"""Math reward: 1.0 when a completion's final answer equals the gold answer, else 0.0 (math-verify).

    from saerl_ray.core.reward import math_reward
    math_reward("... so the total is \\boxed{\\frac{1}{2}}", "0.5")   # -> 1.0
    python -m saerl_ray.core.reward "The answer is 18." "#### 18"         # prints 1.0

The final answer is the last `\\boxed{}` if there is one, else what follows "the answer is", else the
last number. Gold answers arrive in every shape the benchmarks use: GSM8K worked solutions (number
after `####`, thousands commas), AIME "073", AMC 27.0, OlympiadBench lists rendered as text.

math-verify is called with its signal-based timeouts off (`parsing_timeout=None`,
`timeout_seconds=None`): those only work on the main thread, and rewards are computed in trainer
threads and Ray actors. The guard that replaces them is `_explosive`: answers that make sympy
evaluate a power tower or a huge factorial (measured: `10^{10^{10}}` never returns) score 0 without
being parsed, and over-long answers are refused outright.
"""

from __future__ import annotations

import ast
import json
import re
import sys

from math_verify import parse, verify

from saerl_ray.core.config import ANSWER_INSTRUCTION

# Only the tail of a completion can hold its final answer; scanning megabytes of runaway text is waste.
MAX_COMPLETION_CHARS = 20_000
# A real final answer fits in this; longer "answers" are runaway text and may stall sympy.
MAX_ANSWER_CHARS = 500
# Exponents with more digits than this make sympy build astronomically large integers.
MAX_EXPONENT_DIGITS = 6
MAX_FACTORIAL_DIGITS = 5

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\s*\{")
_DIGITS = re.compile(r"\d+")
_TEXTBF = re.compile(r"\\textbf\{\s*\(?\s*([^{}]*?)\s*\)?\s*\}")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (brace-balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def format_messages(problem: str, instruction: str = ANSWER_INSTRUCTION, system: str | None = None) -> list[dict[str, str]]:
    """A problem as a one-turn chat: the instruction on its own line, after an optional system turn."""
    user = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]


def prompt_style(prompt_cfg) -> dict[str, str | None]:
    """`format_messages` / `render_prompts` keywords from the run's `prompt` section."""
    return {"instruction": prompt_cfg.instruction, "system": prompt_cfg.system}


def extract_answer(completion: str) -> str | None:
    """The final answer a completion commits to, as text; None when it states none."""
    text = completion[-MAX_COMPLETION_CHARS:]
    boxed = last_boxed(text)
    if boxed:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def gold_text(answer: str) -> str:
    """Normalise a gold answer from any of our datasets to one LaTeX-ish expression."""
    text = str(answer).strip()
    if "####" in text:  # GSM8K worked solution: the final number follows '####'
        text = text.rsplit("####", 1)[1].strip()
    if text.startswith("[") and text.endswith("]"):  # OlympiadBench final_answer list rendered as text
        text = _join_list_text(text)
    return _clean(text)


def _clean(text: str) -> str:
    """Drop math delimiters, a sentence-final period and answer-choice bold: none change the value."""
    text = text.replace("$", "").strip().rstrip(".").strip()
    text = _TEXTBF.sub(r"\1", text).strip()
    return _strip_thousands(text)


def _join_list_text(text: str) -> str:
    # A Python repr (single quotes, doubled backslashes) or JSON; literal_eval evaluates literals only.
    try:
        items = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text[1:-1]
    if not isinstance(items, (list, tuple)):
        return text
    return ", ".join(str(x).strip().strip("$") for x in items)


def _strip_thousands(text: str) -> str:
    return text.replace(",", "") if _THOUSANDS.fullmatch(text) else text


def _argument_after(text: str, i: int) -> str:
    """The operand starting at text[i]: a brace group (balanced) or one token."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j]
        return text[i + 1 :]
    m = re.match(r"\d+|\\?[A-Za-z]+|.", text[i:])
    return m.group(0) if m else ""


def _explosive(expr: str) -> bool:
    """True when evaluating `expr` could make sympy run for minutes (power towers, huge factorials)."""
    for m in re.finditer(r"\^|\*\*", expr):
        exponent = _argument_after(expr, m.end())
        if "^" in exponent or "**" in exponent or "!" in exponent:
            return True
        if any(len(d) > MAX_EXPONENT_DIGITS for d in _DIGITS.findall(exponent)):
            return True
    for m in re.finditer(r"!", expr):
        operand = _group_before(expr, m.start())
        if "^" in operand or "!" in operand:
            return True
        if any(len(d) > MAX_FACTORIAL_DIGITS for d in _DIGITS.findall(operand)):
            return True
    return False


def _group_before(text: str, end: int) -> str:
    """The operand ending just before text[end]: a bracket group (balanced) or one token."""
    before = text[:end].rstrip()
    if before and before[-1] in ")}]":
        depth = 0
        for j in range(len(before) - 1, -1, -1):
            depth += {")": 1, "}": 1, "]": 1, "(": -1, "{": -1, "[": -1}.get(before[j], 0)
            if depth == 0:
                return before[j:]
        return before
    m = re.search(r"(\d+|\\?[A-Za-z]+)$", before)
    return m.group(0) if m else ""


def _parse(expr: str) -> list:
    # Wrapping in $...$ makes math-verify read the text as LaTeX rather than search it for an answer.
    return parse(f"${expr}$", parsing_timeout=None) or parse(expr, parsing_timeout=None)


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer is mathematically equal to `answer`, else 0.0. Thread-safe."""
    gold = gold_text(answer)
    if not gold:
        raise ValueError("math_reward: empty gold answer (rows without an answer cannot be rewarded)")
    pred = extract_answer(completion or "")
    if pred is None or len(pred) > MAX_ANSWER_CHARS or _explosive(pred):
        return 0.0
    pred = _clean(pred)
    if pred.replace(" ", "") == gold.replace(" ", ""):
        return 1.0
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        # Unparseable on either side: fall back to exact text, which is what a grader would do.
        return float(pred.replace(" ", "") == gold.replace(" ", ""))
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def math_rewards(completions: list[str], answers: list[str]) -> list[float]:
    """`math_reward` over aligned lists (one gold answer per completion)."""
    if len(completions) != len(answers):
        raise ValueError(f"math_rewards: {len(completions)} completions but {len(answers)} answers")
    return [math_reward(c, a) for c, a in zip(completions, answers)]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m saerl_ray.core.reward COMPLETION GOLD_ANSWER")
    print(math_reward(sys.argv[1], sys.argv[2]))
