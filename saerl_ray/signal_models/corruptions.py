"""Corruptions: synthetic low-quality prompts made from real ones, the quality probe's negatives and the
families its leave-one-family-out evaluation holds out. Each kind is a function of the text (and, for some,
another prompt or the answer); FAMILIES groups kinds by the failure they stand for.

    from saerl_ray.signal_models.corruptions import make_negatives, families_of
    neg_texts, neg_kinds, source = make_negatives(texts, answers, seed=0, per_prompt=3)  # source: row of texts
    families_of(neg_kinds)                                                              # e.g. "char_noise"

Kinds, by family:
  truncated       truncate       the problem cut at a word boundary 30-70% of the way (a strict prefix)
  word_order      shuffle        the problem's words in random order
  spliced         mismatch       the first half of this problem + the second half of another one
  answer_leak     leak           the problem followed by "The answer is <its answer>."
  offdomain       offdomain      2-4 sentences of built-in non-math prose
  char_noise      garble         ~30% of the characters replaced by random printable noise
                  cipher         every letter rot13-encoded (a systematic, not random, substitution)
  repetition      repeat         one sentence of the problem repeated 2-3 times in place
  missing_values  blank_numbers  every number (or every $...$ span, else a third of the words) -> "___"
  contradiction   contradict     a sentence restated right after itself with a different number
  no_question     drop_question  the question sentence removed: the setup is left, nothing is asked
  multi_problem   concat         this problem followed by another whole problem
  markup          markup         scraping residue: HTML/LaTeX/wiki tags and entities between words
  stub            stub           an instruction with no problem ("Solve the following problem.")
"""

from __future__ import annotations

import codecs
import re
import string

import numpy as np

FAMILIES: dict[str, tuple[str, ...]] = {
    "truncated": ("truncate",),
    "word_order": ("shuffle",),
    "spliced": ("mismatch",),
    "answer_leak": ("leak",),
    "offdomain": ("offdomain",),
    "char_noise": ("garble", "cipher"),
    "repetition": ("repeat",),
    "missing_values": ("blank_numbers",),
    "contradiction": ("contradict",),
    "no_question": ("drop_question",),
    "multi_problem": ("concat",),
    "markup": ("markup",),
    "stub": ("stub",),
}
FAMILY_OF = {kind: fam for fam, kinds in FAMILIES.items() for kind in kinds}
CORRUPTIONS = tuple(FAMILY_OF)
LEGACY_CORRUPTIONS = ("truncate", "shuffle", "mismatch", "leak", "offdomain", "garble")  # before 2026-12-02

# Non-math prose for `offdomain`, written for this project (no downloads, no licence questions).
OFFDOMAIN_SENTENCES = [
    "Preheat the oven and let the dough rest for twenty minutes before shaping the loaves.",
    "The museum's east wing reopens next spring after a long renovation of its glass roof.",
    "Our support team will reply to your ticket within two business days.",
    "Water the tomatoes early in the morning so the leaves dry before the afternoon sun.",
    "The striker curled the ball past the keeper in the final minute of extra time.",
    "Please remember to bring a reusable bag when you visit the farmers market on Saturday.",
    "The novel follows a lighthouse keeper who writes letters to a sister she has never met.",
    "Heavy rain is expected along the coast tonight, with winds easing by the weekend.",
    "To reset the router, hold the small button on the back for ten seconds.",
    "The committee thanked the volunteers who organised the charity run through the old town.",
    "Add a pinch of salt, stir in the chopped herbs, and simmer the soup on low heat.",
    "The hotel offers a shuttle from the airport every half hour until midnight.",
    "Many migratory birds rest in the wetlands before continuing their journey south.",
    "The band's second album is quieter, built around piano and a string quartet.",
    "Update your password regularly and never share it with anyone over the phone.",
    "The castle on the hill was built as a hunting lodge and later became a school.",
    "She painted the fence a pale green that matched the shutters on the cottage.",
    "Traffic on the main bridge will be diverted while the road surface is repaired.",
    "The documentary explores how coral reefs recover after a season of warm water.",
    "Dear customer, your parcel has been dispatched and should arrive on Thursday.",
    "The chef recommends pairing the mushroom risotto with a light white wine.",
    "Children can borrow up to ten books at a time from the public library.",
    "The hiking trail climbs through pine forest before reaching a quiet mountain lake.",
    "Our meeting is moved to the small conference room on the third floor.",
    "The actor thanked his family and the crew during a short, emotional speech.",
    "Keep the plant away from direct sunlight and mist its leaves once a week.",
    "The festival closes with fireworks over the harbour at ten in the evening.",
    "Knit the first row loosely so the edge of the scarf does not curl.",
    "The report describes how the village restored its mill with local donations.",
    "Please silence your phones before the performance begins.",
]

# Instructions with no problem after them (`stub`): what a broken template or an empty field leaves.
STUB_INSTRUCTIONS = [
    "Solve the following problem.", "Answer the question below. Show your work.",
    "Please reason step by step, and put your final answer within \\boxed{}.", "Problem:",
    "Solve the following math problem. Make sure to put the answer (and only answer) inside \\boxed{}.",
    "Question:", "Compute the answer to the following question and explain your reasoning.",
    "Read the problem carefully and give the final answer.", "Find the value requested below.",
    "Below is a math word problem. Write a response that solves it.",
]
# Scraping residue (`markup`): tags, entities and wiki/LaTeX layout commands that leak from web pages.
MARKUP_TOKENS = [
    "<br/>", "<p>", "</p>", "<div class=\"problem\">", "</div>", "&nbsp;", "&amp;", "<span>", "</span>",
    "\\begin{center}", "\\end{center}", "\\\\", "\\newline", "[img]", "[/img]", "{{cite}}", "<li>", "</li>",
    "<td>", "&lt;", "&gt;", "\\hline", "<!-- -->", "[[File:fig.png]]", "\\vspace{2mm}",
]

_SENT = re.compile(r"(?<=[.?!])\s+")
_NUM = re.compile(r"(?<![A-Za-z_\\\d])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MATH = re.compile(r"\$[^$]+\$")
_QWORD = re.compile(r"\b(What|How|Find|Compute|Calculate|Determine|Evaluate|Which|Show|Prove|Express|Simplify|"
                    r"Convert|Solve|Write|List|Give|Who|When|Where|Why)\b")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENT.split(text.strip()) if s]


# ---------------------------------------------------------------- corruptions (pure, seeded)
def truncate(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    if len(words) < 2:
        return text[: max(1, len(text) // 2)]
    cut = int(np.clip(round(len(words) * rng.uniform(0.3, 0.7)), 1, len(words) - 1))
    return " ".join(words[:cut])


def shuffle(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    if len(set(words)) < 2:
        return "".join(rng.permutation(list(text)))
    for _ in range(10):  # a permutation can land on the original order for short texts
        out = " ".join(words[i] for i in rng.permutation(len(words)))
        if out != " ".join(words):
            return out
    return " ".join(words[::-1])


def mismatch(text: str, other: str, rng: np.random.Generator) -> str:
    a, b = text.split(), other.split()
    cut_a = max(1, len(a) // 2)
    cut_b = max(0, min(len(b) - 1, len(b) // 2))
    return " ".join(a[:cut_a] + b[cut_b:])


def leak(text: str, answer: str) -> str:
    return f"{text.rstrip()} The answer is {answer.strip()}."


def offdomain(rng: np.random.Generator) -> str:
    k = int(rng.integers(2, 5))
    return " ".join(OFFDOMAIN_SENTENCES[i] for i in rng.choice(len(OFFDOMAIN_SENTENCES), k, replace=False))


def garble(text: str, rng: np.random.Generator, rate: float = 0.3) -> str:
    chars = np.array(list(text), dtype=object)
    hit = rng.random(len(chars)) < rate
    noise = list(string.ascii_letters + string.digits + string.punctuation)
    chars[hit] = rng.choice(noise, size=int(hit.sum()))
    return "".join(chars)


def cipher(text: str) -> str:
    """rot13 of every letter: the text keeps its shape, numbers and symbols, but no word is a word."""
    out = codecs.encode(text, "rot13")
    return out if out != text else text + " " + codecs.encode("unreadable", "rot13")


def repeat(text: str, rng: np.random.Generator) -> str:
    """One sentence (the whole text if it has one) repeated 2-3 times in place."""
    sents = _sentences(text) or [text]
    i = int(rng.integers(len(sents)))
    sents = sents[:i] + [sents[i]] * int(rng.integers(2, 4)) + sents[i + 1:]
    return " ".join(sents)


def blank_numbers(text: str, rng: np.random.Generator) -> str:
    """The values a problem needs removed: every number -> "___"; else every $...$ span; else a third of the words."""
    if _NUM.search(text):
        return _NUM.sub("___", text)
    if _MATH.search(text):
        return _MATH.sub("___", text)
    words = text.split()
    hit = rng.random(len(words)) < 1 / 3
    hit[int(rng.integers(len(words)))] = True
    return " ".join("___" if h else w for w, h in zip(words, hit))


def contradict(text: str, rng: np.random.Generator) -> str:
    """A sentence restated right after itself with its numbers changed (two values for one quantity);
    without numbers, its negation ("It is not true that ...") follows it."""
    sents = _sentences(text) or [text]
    with_num = [i for i, s in enumerate(sents) if _NUM.search(s)]
    if with_num:
        i = int(rng.choice(with_num))

        def other(m: re.Match) -> str:
            v = m.group(0).replace(",", "")
            n = float(v) if "." in v else int(v)
            return str(n + int(rng.integers(2, 9)) * (1 if rng.random() < 0.5 or n < 10 else -1))

        changed = _NUM.sub(other, sents[i])
        return " ".join(sents[: i + 1] + [changed] + sents[i + 1:])
    i = int(rng.integers(len(sents)))
    s = sents[i]
    return " ".join(sents[: i + 1] + ["It is not true that " + s[:1].lower() + s[1:]] + sents[i + 1:])


def drop_question(text: str, rng: np.random.Generator) -> str:
    """The question removed: the last sentence with a "?" (else with a question word such as Find or Compute,
    else the last sentence) when there are several;
    a one-sentence problem loses everything from its last question word on (else its last clause)."""
    sents = _sentences(text)
    if len(sents) >= 2:
        q = [i for i, s in enumerate(sents) if "?" in s] or [i for i, s in enumerate(sents) if _QWORD.search(s)]
        i = q[-1] if q else len(sents) - 1
        return " ".join(sents[:i] + sents[i + 1:])
    hits = [m.start() for m in _QWORD.finditer(text)]
    if hits and hits[-1] > 0:
        return text[: hits[-1]].rstrip(" ,;:")
    cut = text.rfind(",")
    if cut > 0:
        return text[:cut]
    return truncate(text, rng)


def concat(text: str, other: str) -> str:
    """Two whole problems in one prompt: which one is to be answered?"""
    return f"{text.rstrip()} {other.strip()}"


def markup(text: str, rng: np.random.Generator, rate: float = 0.2) -> str:
    """Scraping residue: markup tokens at ~20% of the word gaps (at least one) and around the text."""
    words = text.split()
    hit = rng.random(len(words) + 1) < rate
    hit[int(rng.integers(len(words) + 1))] = True
    out = []
    for i in range(len(words) + 1):
        if hit[i]:
            out.append(str(rng.choice(MARKUP_TOKENS)))
        if i < len(words):
            out.append(words[i])
    return " ".join(out)


def stub(rng: np.random.Generator) -> str:
    """An instruction with no problem after it, sometimes numbered."""
    s = STUB_INSTRUCTIONS[int(rng.integers(len(STUB_INSTRUCTIONS)))]
    return f"Problem {int(rng.integers(1, 60))}. {s}" if rng.random() < 0.3 else s


def corrupt(kind: str, i: int, texts: list[str], answers: list[str], rng: np.random.Generator) -> str:
    text = texts[i]

    def another() -> str:
        j = int(rng.integers(len(texts) - 1))
        return texts[j + (j >= i)]

    if kind == "truncate":
        return truncate(text, rng)
    if kind == "shuffle":
        return shuffle(text, rng)
    if kind == "mismatch":
        return mismatch(text, another(), rng)
    if kind == "leak":
        return leak(text, answers[i])
    if kind == "offdomain":
        return offdomain(rng)
    if kind == "garble":
        return garble(text, rng)
    if kind == "cipher":
        return cipher(text)
    if kind == "repeat":
        return repeat(text, rng)
    if kind == "blank_numbers":
        return blank_numbers(text, rng)
    if kind == "contradict":
        return contradict(text, rng)
    if kind == "drop_question":
        return drop_question(text, rng)
    if kind == "concat":
        return concat(text, another())
    if kind == "markup":
        return markup(text, rng)
    if kind == "stub":
        return stub(rng)
    raise ValueError(f"unknown corruption {kind!r}; signals.quality.corruptions must be among {CORRUPTIONS}")


def families_of(kinds) -> np.ndarray:
    """The family of each corruption kind (a label that is no kind, e.g. "labelled", is its own family)."""
    return np.asarray([FAMILY_OF.get(str(k), str(k)) for k in kinds], dtype=str)


def make_negatives(
    texts: list[str], answers: list[str] | None = None, seed: int = 0, types: list[str] | None = None,
    per_prompt: int = 1,
) -> tuple[list[str], list[str], np.ndarray]:
    """(negatives, their kinds, source): `per_prompt` negatives per text, negative j derived from
    texts[source[j]] (source[j] = j % len(texts); evaluation keeps each pair on one side). Kinds are dealt
    round-robin over a seeded permutation, so each kind gets an equal share of random prompts, and each
    round shifts a prompt to the next kind (its negatives differ in kind). `leak` needs an answer: rows
    without one get the next kind instead."""
    types = list(types or CORRUPTIONS)
    bad = [t for t in types if t not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption {bad[0]!r}; signals.quality.corruptions must be among {CORRUPTIONS}")
    if len(texts) < 2:
        raise ValueError("synthetic quality negatives need at least 2 prompts")
    if per_prompt < 1:
        raise ValueError(f"signals.quality.negatives_per_prompt must be >= 1, got {per_prompt}")
    answers = list(answers) if answers is not None else [""] * len(texts)
    rng = np.random.default_rng(seed)
    slot = np.empty(len(texts), dtype=np.int64)
    slot[rng.permutation(len(texts))] = np.arange(len(texts)) % len(types)
    out_t, out_k = [], []
    for r in range(per_prompt):
        for i, s in enumerate((slot + r) % len(types)):
            kind = types[s]
            if kind == "leak" and not (answers[i] or "").strip() and len(types) > 1:
                kind = types[(s + 1) % len(types)]
            out_t.append(corrupt(kind, i, texts, answers, rng))
            out_k.append(kind)
    return out_t, out_k, np.arange(len(out_t)) % len(texts)
