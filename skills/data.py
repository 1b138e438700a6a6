"""Training examples of the default world, as token ids with the positions that carry loss.

Texts are encoded segment by segment with a learn flag per segment (the tokenizer is one token
per character, so segments concatenate exactly). The base model learns solutions, with tool
blocks whose call and result it does *not* learn to write (the tool selector proposes the call,
the calculator writes the result); instructed transformations. Skills learn their answers only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import re

from .tasks import CALC_CLOSE, CALC_OPEN, Problem, Step, Transform, claims, corrupt, split_steps, step_ok
from .tokenizer import CHECK, EOS, NO, SELECT, VERIFY, YES
from .train import Example, lm_example


_EXPR_RE = re.compile(r"(-?\d+)([*+-])(\d+)$")
_VALUE_RE = re.compile(r"=\s*(-?\d+)")


@dataclass
class Encoder:
    """Chat-formatted encoding with per-segment learn flags."""

    tokenizer: object

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, user: str) -> list[int]:
        """`<bos><|user|>{user}<|end|><|assistant|>` as ids."""
        return self.ids(self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                           add_generation_prompt=True))

    def segments(self, parts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        ids, learn = [], []
        for text, flag in parts:
            t = self.ids(text)
            ids += t
            learn += [flag] * len(t)
        return ids, learn

    def example(self, user: str, parts: Sequence[tuple[str, bool]], **kw) -> Example:
        p = self.prompt(user)
        ids, learn = self.segments(parts)
        return lm_example(p + ids, len(p), [False] * len(p) + learn, **kw)

    def invoked(self, context: list[int], invocation: str, answer: str, evidence: str = "", **kw) -> Example:
        """An activated skill's example: context + invocation (+ evidence) -> answer; the adapter
        covers the positions from the invocation on (so it computes the evidence itself)."""
        inv = self.ids(invocation + evidence)
        ans = self.ids(answer)
        tokens = context + inv + ans
        return lm_example(tokens, len(context) + len(inv), start=len(context), **kw)


def solution_parts(problem: Problem, tool: bool) -> list[tuple[str, bool]]:
    """The solution's segments; with the tool, `[CALC]b*c[/CALC]=v` is not learned."""
    parts: list[tuple[str, bool]] = []
    for i, s in enumerate(problem.steps):
        if i:
            parts.append((" ", True))
        if tool and s.op == "*":
            parts += [(f"{CALC_OPEN}{s.expr}{CALC_CLOSE}={s.value}", False), (".", True)]
        else:
            parts.append((s.text(), True))
    parts += [(f" Answer: {problem.answer}", True), (EOS, True)]
    return parts


def base_example(enc: Encoder, rng: random.Random, problems: Sequence[Problem], transforms: Sequence[Transform],
                 seed: int) -> Example:
    """One pretraining example: 45% plain solution, 25% tool-format solution, 30% instructed task."""
    u = rng.random()
    if u < 0.7:
        p = rng.choice(problems)
        return enc.example(p.question, solution_parts(p, tool=u >= 0.45))
    t = rng.choice(transforms)
    x = t.make_input(rng)
    return enc.example(f"{t.instruction}: {x}", [(t.apply(x), True), (EOS, True)])


# ------------------------------------------------------------------------------------ skills


@dataclass
class Sample:
    """One of the base model's own solutions to a problem."""

    problem: Problem
    text: str
    finished: bool

    @property
    def correct(self) -> bool:
        from .tasks import parse_answer

        return self.finished and parse_answer(self.text) == self.problem.answer

    def step_labels(self) -> list[tuple[int, bool]]:
        """(k, step k ok) for the steps up to and including the first wrong one."""
        steps = split_steps(self.text)
        out = []
        for k in range(len(steps)):
            ok = step_ok(self.problem, steps, k)
            out.append((k, ok))
            if not ok:
                break
        return out


def verifier_context(enc: Encoder, problem: Problem, solution: str) -> list[int]:
    """What the verifier reads: the conversation with the finished solution (its `<|end|>`)."""
    return enc.prompt(problem.question) + enc.ids(solution + EOS)


def self_eval_context(enc: Encoder, problem: Problem, steps: Sequence[str]) -> list[int]:
    """What the step checker reads: the conversation up to the end of the step to judge."""
    return enc.prompt(problem.question) + enc.ids(" ".join(steps))


def selector_context(enc: Encoder, problem: Problem, done: str) -> list[int]:
    """What the tool selector reads: the conversation up to a step boundary (`done` ends with a
    space, or is empty at the start of the solution)."""
    return enc.prompt(problem.question) + enc.ids(done)


def selector_target(step) -> str:
    """Call the calculator for products; nothing (end) for additions and for the answer."""
    return f"{CALC_OPEN}{step.expr}{CALC_CLOSE}" if step is not None and step.op == "*" else EOS


def evidence(checks: Sequence[tuple[str, str, str]]) -> str:
    """What a tool-checked skill reads after its invocation: the calculator's verdict on each
    claim of the text, in order, `v` (right) or `x` (wrong), for (expression, value claimed,
    value computed): `xv` for `37*49=1773. 1773+12=1785.` The answer is read right after it.

    Why verdicts, and why so short. Pilots: given both values (`37*49=1773:1813`, before or after
    the invocation), a rank-2 or rank-8 activated adapter on the 3M base did not learn to compare
    them (loss at chance, 0.60-0.70, after 300-600 steps); with a verdict per claim it learned at
    once (loss 0.01; within-problem AUROC 0.99). One character per claim keeps verification to a
    few computed tokens over the cached solution (a `?` after the verdicts cost 12% of
    best-of-8's wall time in verification; without it, see the README). What the skill still judges itself: whether
    the steps chain, use the question's numbers, and end in the answer they computed."""
    return "".join("v" if claimed == computed else "x" for _, claimed, computed in checks)


def calc_checks(text: str) -> list[tuple[str, str, str]]:
    """(expression, claimed, computed) for the claims of `text`, computed exactly: the training
    side of the orchestrator's calculator check (which runs the safe calculator tool)."""
    out = []
    for expr, claimed in claims(text):
        m = _EXPR_RE.match(expr)
        out.append((expr, claimed, str(Step(int(m.group(1)), m.group(2), int(m.group(3))).value)))
    return out


def corrupt_claim(text: str, rng: random.Random) -> str:
    """`text` with one digit of one claimed value changed (a wrong result the calculator exposes)."""
    ms = list(_VALUE_RE.finditer(text))
    if not ms:
        return text + "1"
    m = rng.choice(ms)
    v = m.group(1)
    i = rng.randrange(1 if v.startswith("-") else 0, len(v))
    digits = [c for c in "0123456789" if c != v[i] and not (i == 0 and c == "0" and len(v) > 1)]
    return text[:m.start(1) + i] + rng.choice(digits) + text[m.start(1) + i + 1:]


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A solution with the base model's typical error: the product off by one digit, and the
    steps after it computed right from the wrong value (so the answer is wrong)."""
    first = problem.steps[0]
    v = str(first.value)
    i = rng.randrange(len(v))
    digits = [c for c in "0123456789" if c != v[i] and not (i == 0 and c == "0")]
    value = int(v[:i] + rng.choice(digits) + v[i + 1:])
    parts, prev = [f"{first.expr}={value}."], value
    for st in problem.steps[1:]:
        step = Step(prev, st.op, st.right)
        parts.append(step.text())
        prev = step.value
    return " ".join(parts) + f" Answer: {prev}"


def verifier_example(enc: Encoder, s: Sample, adapter: int, text: str | None = None, ok: bool | None = None) -> Example:
    """Is the finished solution right? The verifier reads the calculator's check of its claims."""
    text = text if text is not None else s.text
    ok = ok if ok is not None else s.correct
    return enc.invoked(verifier_context(enc, s.problem, text), VERIFY, YES if ok else NO,
                       evidence=evidence(calc_checks(text)), adapter=adapter)


def self_eval_example(enc: Encoder, s: Sample, k: int, ok: bool, adapter: int, steps: list[str] | None = None) -> Example:
    """Is step k right? The step checker reads the calculator's check of the claims so far."""
    steps = steps if steps is not None else split_steps(s.text)
    text = " ".join(steps[: k + 1])
    return enc.invoked(self_eval_context(enc, s.problem, steps[: k + 1]), CHECK, YES if ok else NO,
                       evidence=evidence(calc_checks(text)), adapter=adapter)


def contrast_example(enc: Encoder, rng: random.Random, s: Sample, skill: str, adapter: int) -> Example:
    """From a right solution: itself, or with one claimed value changed (half each). The same
    problem and wording either way, so only the claims' check tells them apart: this is what
    teaches a skill to judge the answer rather than the problem's difficulty."""
    ok = rng.random() < 0.5
    if skill == "verifier":
        return verifier_example(enc, s, adapter, s.text if ok else wrong_solution(s.problem, rng), ok)
    steps = split_steps(s.text)
    k = rng.randrange(len(steps))
    if not ok:
        steps = steps[:k] + [corrupt_claim(steps[k], rng)]
    return self_eval_example(enc, s, k, ok, adapter, steps)


def selector_example(enc: Encoder, rng: random.Random, problem: Problem, adapter: int) -> Example:
    done, step = rng.choice(problem.prefixes(tool=rng.random() < 0.7))
    return enc.invoked(selector_context(enc, problem, done), SELECT, selector_target(step), adapter=adapter)


def task_example(enc: Encoder, rng: random.Random, t: Transform, adapter: int) -> Example:
    x = t.make_input(rng)
    return enc.example(t.prompt(x), [(t.apply(x), True), (EOS, True)], adapter=adapter)


def checker_context(enc: Encoder, t: Transform, x: str, candidate: str) -> list[int]:
    return enc.prompt(t.prompt(x)) + enc.ids(candidate + EOS)


def checker_candidate(t: Transform, x: str, good: bool, rng: random.Random) -> str:
    """The answer a per-task verifier judges: the task's output for `x`, or a wrong one. For
    `replace a b` the wrong answers are the two ways a multi-adapter system gets it wrong: the
    input unchanged (no adapter, or one that does nothing) and `a` replaced by another letter (a
    sibling task's adapter). Other families: one character changed (a near miss)."""
    y = t.apply(x)
    if good:
        return y
    if t.family == "replace":
        a, b = t.arg.split()
        cand = x if rng.random() < 0.5 else x.replace(a, rng.choice([c for c in t.alphabet if c not in (a, b)]))
        if cand != y:
            return cand
    return corrupt(y, t.alphabet, rng)


def checker_example(enc: Encoder, rng: random.Random, t: Transform, adapter: int) -> Example:
    """A per-task verifier's example: is the candidate the task's output for `x`? (half are not)"""
    x = t.make_input(rng)
    good = rng.random() < 0.5
    return enc.invoked(checker_context(enc, t, x, checker_candidate(t, x, good, rng)), VERIFY, YES if good else NO,
                       adapter=adapter)
