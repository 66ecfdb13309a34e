"""The verifiable task (`--task arithmetic`): short problems with an exactly checkable answer, generated in code.

Small-number arithmetic: additions and subtractions within 0..12 and the multiplication table to 10 x 10, each
fact asked in two wordings ("What is 7 + 5?", "What is 7 plus 5?"). Each prompt is one chat request asking for
the number alone; its `answer` column is the exact answer, which forward/answers.py's `accuracy_reward` checks (the
completion's final number) and `format_reward` rewards the form of (the number alone).

The difficulty is set for the default model: SmolLM2-135M-Instruct, sampling at temperature 1 as the online
recipes do, answers about a fifth of the held-out problems right (README, "A verifiable task"). Harder kinds were
measured first and left out: two-digit additions (~2%), counting the items of a list (~4%) and unit conversions
(~1%) leave too few correct samples to learn from.

Every fact (operation and operands) belongs to the training or the held-out set by its hash, whatever --seed and
the counts: the two never share a problem, nor a problem's arithmetic in another wording. --seed picks which
problems of each set a run uses and their order.
"""

from __future__ import annotations

import hashlib
import random

Messages = list[dict[str, str]]
Fact = tuple[str, int, int]  # (operation, a, b)
Problem = tuple[str, int]  # (question, answer)

INSTRUCTION = "Answer with the number only."
HELD_OUT_SHARE = 3  # one fact in 3 is held out (by hash)
# each operation's wordings: every fact is asked in each, and a fact's wordings are all training or all held out
WORDINGS = {
    "+": ("What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} + {b}?"),
    "-": ("What is {a} - {b}?", "What is {a} minus {b}?", "How much is {a} - {b}?"),
    "x": ("What is {a} x {b}?", "What is {a} times {b}?", "How much is {a} x {b}?"),
}


def facts() -> list[Fact]:
    """Additions of one-digit numbers, subtractions with a one-digit answer and subtrahend (a - b, b in 0..9), and
    the multiplication table to 10 x 10: 300 facts."""
    digits = range(10)
    return ([("+", a, b) for a in digits for b in digits]
            + [("-", a + b, b) for a in digits for b in digits]
            + [("x", a, b) for a in range(1, 11) for b in range(1, 11)])


def answer_of(fact: Fact) -> int:
    operation, a, b = fact
    return a + b if operation == "+" else a - b if operation == "-" else a * b


def is_held_out(fact: Fact) -> bool:
    """Whether a fact is held out: by a hash of the fact alone, so that the sets are disjoint for any seed (a
    held-out problem's arithmetic is never trained on, in any wording)."""
    return int(hashlib.sha256(repr(fact).encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def problem_pool(held_out: bool) -> list[Problem]:
    """Every problem of one set: each of its facts in each wording, in a fixed order."""
    return [(wording.format(a=fact[1], b=fact[2]), answer_of(fact)) for fact in facts()
            if is_held_out(fact) == held_out for wording in WORDINGS[fact[0]]]


def make_problems(count: int, seed: int, held_out: bool) -> list[Problem]:
    """`count` distinct problems of the training or the held-out set, drawn by `seed`."""
    pool = problem_pool(held_out)
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} {'held-out' if held_out else 'training'} problems available")
    return random.Random(seed + int(held_out)).sample(pool, count)


def prompt_of(question: str) -> Messages:
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def make_rows(count: int, seed: int, held_out: bool) -> list[tuple[Messages, dict[str, str]]]:
    """The prompts and their columns: (one user message, {"answer": the exact answer as text})."""
    return [(prompt_of(q), {"answer": str(a)}) for q, a in make_problems(count, seed, held_out)]
