"""The default world's tasks: multi-step arithmetic written as steps, and string transformations.

Arithmetic problems are expressions like `37*49+12`; a solution is one step per operation, then
the answer: `37*49=1813. 1813+12=1825. Answer: 1825`. A tiny model gets the 2-digit products
wrong often (the additions rarely), so a calculator, a verifier or a step checker has room to
help. With the tool, a product step is written `[CALC]37*49[/CALC]=1813.`: the tool selector
proposes the call, the calculator inserts `=1813`, and the model continues.

Transformations map a short string to another: `shift k` (Caesar shift of letters), `add k`
(add k to every digit mod 10) and `replace x y` (every x becomes y). The base model learns them
with the full instruction in the prompt (`shift 3: hello` -> `khoor`); a task adapter learns one
of them from the operation alone (`shift: hello` -> `khoor` is the adapter `shift-3`), so each of
hundreds of adapters carries real knowledge the prompt lacks.

Every generator is driven by a `random.Random`; a stable hash puts 1 in 8 problems / inputs in
the held-out split, which training never sees.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from .tokenizer import CALC_CLOSE, CALC_OPEN

TEMPLATES = ("{b}*{c}+{a}", "{b}*{c}-{a}", "{b}*{c}+{a}-{d}")
_STEP_RE = re.compile(r"^(-?\d+)([*+-])(\d+)=(-?\d+)$")


def is_heldout(key: str) -> bool:
    """True for the held-out split (a stable 1-in-8 hash of the problem or input text)."""
    return zlib.crc32(key.encode()) % 8 == 0


def _want(key: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return is_heldout(key) == (split == "test")


# ------------------------------------------------------------------------------ arithmetic


@dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int

    @property
    def value(self) -> int:
        return {"*": self.left * self.right, "+": self.left + self.right, "-": self.left - self.right}[self.op]

    @property
    def expr(self) -> str:
        return f"{self.left}{self.op}{self.right}"

    def text(self, tool: bool = False) -> str:
        """`37*49=1813.`, or with the tool for products `[CALC]37*49[/CALC]=1813.`"""
        if tool and self.op == "*":
            return f"{CALC_OPEN}{self.expr}{CALC_CLOSE}={self.value}."
        return f"{self.expr}={self.value}."


@dataclass(frozen=True)
class Problem:
    question: str
    """the expression, e.g. `37*49+12` (the user message)"""
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].value

    def solution(self, tool: bool = False) -> str:
        """`37*49=1813. 1813+12=1825. Answer: 1825`"""
        return " ".join(s.text(tool) for s in self.steps) + f" Answer: {self.answer}"

    def prefixes(self, tool: bool = True) -> list[tuple[str, Step | None]]:
        """(solution text so far, next step) at every step boundary; the last has no step left."""
        out, done = [], ""
        for s in self.steps:
            out.append((done, s))
            done += s.text(tool) + " "
        out.append((done, None))
        return out


def make_problem(rng: random.Random) -> Problem:
    """One random problem: b two-digit, c one or two digits (half each), a and d up to 99."""
    template = rng.choice(TEMPLATES)
    b = rng.randint(10, 99)
    c = rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(10, 99)
    a, d = rng.randint(1, 99), rng.randint(1, 99)
    prod = b * c
    if "-{a}" in template:
        a = rng.randint(1, min(99, prod - 1))
    steps = [Step(b, "*", c), Step(prod, "+" if "+{a}" in template else "-", a)]
    if "{d}" in template:
        steps.append(Step(steps[-1].value, "-", min(d, steps[-1].value - 1)))
    q = template.format(b=b, c=c, a=a, d=steps[-1].right)
    return Problem(q, tuple(steps))


def problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """`n` distinct problems of the split, reproducibly from `seed`."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        p = make_problem(rng)
        if p.question not in seen and _want(p.question, split):
            seen.add(p.question)
            out.append(p)
    return out


def parse_answer(text: str) -> int | None:
    """The integer after the last `Answer:` in a solution, or None."""
    m = re.findall(r"Answer:\s*(-?\d+)", text)
    return int(m[-1]) if m else None


_CLAIM_RE = re.compile(r"(-?\d+)\s*([*+-])\s*(\d+)\s*=\s*(-?\d+)")


def claims(text: str) -> list[tuple[str, str]]:
    """The arithmetic claims `a op b = c` a solution makes (tool markup read through), as
    (`a op b`, `c`) in order: what a tool can check."""
    body = text.replace(CALC_OPEN, "").replace(CALC_CLOSE, "")
    return [(f"{a}{op}{b}", c) for a, op, b, c in _CLAIM_RE.findall(body)]


def split_steps(text: str) -> list[str]:
    """A solution's step texts, each ending with its `.` (the answer part is not a step)."""
    body = text.split("Answer:")[0]
    return [s.strip() + "." for s in body.split(".") if s.strip()]


def step_ok(problem: Problem, solution_steps: list[str], k: int) -> bool:
    """Is step k right, given the steps before it? (its operands are the previous result and the
    problem's next operand, and its arithmetic is exact; tool markup is read through)."""
    if k >= len(problem.steps):
        return False
    text = solution_steps[k].replace(CALC_OPEN, "").replace(CALC_CLOSE, "").rstrip(".")
    m = _STEP_RE.match(text)
    if not m:
        return False
    left, op, right, value = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    gold = problem.steps[k]
    if k == 0:
        want_left = gold.left
    else:
        prev = _STEP_RE.match(solution_steps[k - 1].replace(CALC_OPEN, "").replace(CALC_CLOSE, "").rstrip("."))
        want_left = int(prev.group(4)) if prev else None
    return left == want_left and op == gold.op and right == gold.right and Step(left, op, right).value == value


# ------------------------------------------------------------------------------ transformations

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


@dataclass(frozen=True)
class Transform:
    """One parameterised string task, e.g. `shift 3`, `add 7`, `replace e a`."""

    family: str
    arg: str

    @property
    def instruction(self) -> str:
        return f"{self.family} {self.arg}"

    @property
    def name(self) -> str:
        return f"{self.family}-{self.arg.replace(' ', '')}"

    @classmethod
    def parse(cls, instruction: str) -> Transform:
        """`shift 3` -> Transform("shift", "3")."""
        family, _, arg = instruction.partition(" ")
        if family not in ("shift", "add", "replace") or not arg:
            raise ValueError(f"not a transformation: {instruction!r} (expected e.g. 'shift 3', 'add 7', 'replace e a')")
        return cls(family, arg)

    def prompt(self, x: str) -> str:
        """The user message a task adapter answers: the operation, not its parameter
        (`shift: hello`; the adapter `shift-3` knows k = 3)."""
        return f"{self.family}: {x}"

    @property
    def alphabet(self) -> str:
        return DIGITS if self.family == "add" else LETTERS

    def apply(self, s: str) -> str:
        if self.family == "shift":
            k = int(self.arg)
            return "".join(LETTERS[(LETTERS.index(ch) + k) % 26] for ch in s)
        if self.family == "add":
            k = int(self.arg)
            return "".join(DIGITS[(int(ch) + k) % 10] for ch in s)
        if self.family == "replace":
            x, y = self.arg.split()
            return s.replace(x, y)
        raise ValueError(f"unknown transformation family {self.family!r}")

    def make_input(self, rng: random.Random) -> str:
        n = rng.randint(3, 7)
        if self.family == "replace":  # make sure the letter to replace shows up most of the time
            x = self.arg.split()[0]
            chars = [rng.choice(LETTERS) for _ in range(n)]
            for _ in range(rng.randint(0, 2)):
                chars[rng.randrange(n)] = x
            return "".join(chars)
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def inputs(self, n: int, seed: int, split: str = "train") -> list[str]:
        rng, out = random.Random(f"{seed}:{self.name}"), []
        seen: set[str] = set()
        for _ in range(100 * n):
            if len(out) == n:
                break
            s = self.make_input(rng)
            if s not in seen and _want(self.name + ":" + s, split):
                seen.add(s)
                out.append(s)
        return out


def transform_family(n_shift: int = 25, n_add: int = 9, n_replace: int = 266, seed: int = 0) -> list[Transform]:
    """`shift k` (k = 1..n_shift), `add k` (k = 1..n_add) and `n_replace` random `replace x y`
    tasks: 300 with the defaults."""
    fam = [Transform("shift", str(k)) for k in range(1, n_shift + 1)] + \
        [Transform("add", str(k)) for k in range(1, n_add + 1)]
    pairs = [(x, y) for x in LETTERS for y in LETTERS if x != y]
    random.Random(seed).shuffle(pairs)
    return fam + [Transform("replace", f"{x} {y}") for x, y in pairs[:n_replace]]


def corrupt(s: str, alphabet: str, rng: random.Random) -> str:
    """Change one character of `s` to another of the alphabet (a near-miss wrong answer)."""
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([c for c in alphabet if c != s[i]]) + s[i + 1:]
