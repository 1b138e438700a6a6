"""Training examples of the default world, as token ids with the positions that carry loss.

Texts are encoded segment by segment with a learn flag per segment (the tokenizer is one token
per character, so segments concatenate exactly). The base model learns solutions, with tool
blocks whose call and result it does *not* learn to write (the tool selector proposes the call,
the calculator writes the result); instructed transformations. Skills learn their answers only.

Conversations vary as users' do (`Encoder(variety=...)`): a question may come phrased in words
("What is 58*63-17?"), after a system prompt, or after an earlier exchange, so that the base and
the skills on it read the problem wherever it sits in the chat. The prompt never carries loss.
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


PHRASINGS = ["{q}", "What is {q}?", "what is {q}", "Compute {q}.", "Calculate {q}", "{q} = ?", "{q}=?",
             "Please solve {q}", "Solve: {q}", "How much is {q}?", "{q}?", "Can you work out {q}?",
             "What's {q}?", "Evaluate {q}.", "I need {q}", "Quick one: {q}"]
"""how users ask an arithmetic question `{q}` (the first is the world's own form)"""
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Answer the question.",
                  "You are a careful math tutor. Show your steps.", "Answer concisely.",
                  "You are kilolora, a small model that solves arithmetic and string tasks.",
                  "Think step by step.", "You are an AI assistant that helps people find information.",
                  "Be precise."]
"""system prompts agent frameworks and users commonly send"""


def phrase(question: str, rng: random.Random) -> str:
    """An arithmetic question as a user might write it."""
    return rng.choice(PHRASINGS).format(q=question)


@dataclass
class Encoder:
    """Chat-formatted encoding with per-segment learn flags. With `variety` > 0 and an `rng`,
    `prompt` adds, each with probability `variety`, a system prompt and an earlier exchange."""

    tokenizer: object
    variety: float = 0.0

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, user: str, rng: random.Random | None = None) -> list[int]:
        """`<bos><|user|>{user}<|end|><|assistant|>` as ids (with `rng`: maybe a system prompt and
        an earlier turn before it)."""
        msgs = [{"role": "user", "content": user}]
        if rng is not None and self.variety > 0:
            if rng.random() < self.variety:
                msgs = _earlier_turn(rng) + msgs
            if rng.random() < self.variety:
                msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + msgs
        return self.ids(self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

    def segments(self, parts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        ids, learn = [], []
        for text, flag in parts:
            t = self.ids(text)
            ids += t
            learn += [flag] * len(t)
        return ids, learn

    def example(self, user: str, parts: Sequence[tuple[str, bool]], rng: random.Random | None = None,
                **kw) -> Example:
        p = self.prompt(user, rng)
        ids, learn = self.segments(parts)
        return lm_example(p + ids, len(p), [False] * len(p) + learn, **kw)

    def invoked(self, context: list[int], invocation: str, answer: str, evidence: str = "", **kw) -> Example:
        """An activated skill's example: context + invocation (+ evidence) -> answer; the adapter
        covers the positions from the invocation on (so it computes the evidence itself)."""
        inv = self.ids(invocation + evidence)
        ans = self.ids(answer)
        tokens = context + inv + ans
        return lm_example(tokens, len(context) + len(inv), start=len(context), **kw)


def _earlier_turn(rng: random.Random) -> list[dict]:
    """One earlier exchange of the chat: an arithmetic problem and its solution, a transformation
    and its result, or a greeting."""
    from .tasks import make_problem

    u = rng.random()
    if u < 0.5:
        p = make_problem(rng)
        return [{"role": "user", "content": phrase(p.question, rng)},
                {"role": "assistant", "content": p.solution(tool=rng.random() < 0.5)}]
    if u < 0.8:
        t = Transform(*rng.choice([("shift", str(rng.randint(1, 25))), ("add", str(rng.randint(1, 9))),
                                   ("replace", " ".join(rng.sample("abcdefghijklmnopqrstuvwxyz", 2)))]))
        x = t.make_input(rng)
        return [{"role": "user", "content": f"{t.instruction}: {x}"}, {"role": "assistant", "content": t.apply(x)}]
    return [{"role": "user", "content": rng.choice(["hi", "hello", "Hi there!", "thanks"])},
            {"role": "assistant", "content": rng.choice(["Hello!", "Hi! Ask me a problem.", "You're welcome."])}]


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
        q = phrase(p.question, rng) if enc.variety and rng.random() < enc.variety else p.question
        return enc.example(q, solution_parts(p, tool=u >= 0.45), rng=rng)
    t = rng.choice(transforms)
    x = t.make_input(rng)
    return enc.example(f"{t.instruction}: {x}", [(t.apply(x), True), (EOS, True)], rng=rng)


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


def _question(enc: Encoder, problem: Problem, rng: random.Random | None) -> list[int]:
    """The conversation's prompt for `problem`: the world's form, or (with `rng` and the encoder's
    variety) phrased in words after a system prompt or an earlier turn."""
    if rng is None or not enc.variety:
        return enc.prompt(problem.question)
    q = phrase(problem.question, rng) if rng.random() < enc.variety else problem.question
    return enc.prompt(q, rng)


def verifier_context(enc: Encoder, problem: Problem, solution: str, rng: random.Random | None = None) -> list[int]:
    """What the verifier reads: the conversation with the finished solution (its `<|end|>`)."""
    return _question(enc, problem, rng) + enc.ids(solution + EOS)


def self_eval_context(enc: Encoder, problem: Problem, steps: Sequence[str], rng: random.Random | None = None
                      ) -> list[int]:
    """What the step checker reads: the conversation up to the end of the step to judge."""
    return _question(enc, problem, rng) + enc.ids(" ".join(steps))


def selector_context(enc: Encoder, problem: Problem, done: str, rng: random.Random | None = None) -> list[int]:
    """What the tool selector reads: the conversation up to a step boundary (`done` ends with a
    space, or is empty at the start of the solution)."""
    return _question(enc, problem, rng) + enc.ids(done)


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


def verifier_example(enc: Encoder, s: Sample, adapter: int, text: str | None = None, ok: bool | None = None,
                     rng: random.Random | None = None) -> Example:
    """Is the finished solution right? The verifier reads the calculator's check of its claims."""
    text = text if text is not None else s.text
    ok = ok if ok is not None else s.correct
    return enc.invoked(verifier_context(enc, s.problem, text, rng), VERIFY, YES if ok else NO,
                       evidence=evidence(calc_checks(text)), adapter=adapter)


def self_eval_example(enc: Encoder, s: Sample, k: int, ok: bool, adapter: int, steps: list[str] | None = None,
                      rng: random.Random | None = None) -> Example:
    """Is step k right? The step checker reads the calculator's check of the claims so far."""
    steps = steps if steps is not None else split_steps(s.text)
    text = " ".join(steps[: k + 1])
    return enc.invoked(self_eval_context(enc, s.problem, steps[: k + 1], rng), CHECK, YES if ok else NO,
                       evidence=evidence(calc_checks(text)), adapter=adapter)


def contrast_example(enc: Encoder, rng: random.Random, s: Sample, skill: str, adapter: int) -> Example:
    """From a right solution: itself, or with one claimed value changed (half each). The same
    problem and wording either way, so only the claims' check tells them apart: this is what
    teaches a skill to judge the answer rather than the problem's difficulty."""
    ok = rng.random() < 0.5
    if skill == "verifier":
        return verifier_example(enc, s, adapter, s.text if ok else wrong_solution(s.problem, rng), ok, rng)
    steps = split_steps(s.text)
    k = rng.randrange(len(steps))
    if not ok:
        steps = steps[:k] + [corrupt_claim(steps[k], rng)]
    return self_eval_example(enc, s, k, ok, adapter, steps, rng)


def selector_example(enc: Encoder, rng: random.Random, problem: Problem, adapter: int) -> Example:
    done, step = rng.choice(problem.prefixes(tool=rng.random() < 0.7))
    return enc.invoked(selector_context(enc, problem, done, rng), SELECT, selector_target(step), adapter=adapter)


def task_example(enc: Encoder, rng: random.Random, t: Transform, adapter: int) -> Example:
    x = t.make_input(rng)
    return enc.example(t.prompt(x), [(t.apply(x), True), (EOS, True)], rng=rng, adapter=adapter)


def checker_context(enc: Encoder, t: Transform, x: str, candidate: str, rng: random.Random | None = None) -> list[int]:
    return enc.prompt(t.prompt(x), rng) + enc.ids(candidate + EOS)


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
    return enc.invoked(checker_context(enc, t, x, checker_candidate(t, x, good, rng), rng), VERIFY, YES if good else NO,
                       adapter=adapter)
