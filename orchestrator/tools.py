"""The orchestrator's calculator tool: exact arithmetic on untrusted model output.

A small model writes ``[CALC]37*49[/CALC]``; the orchestrator hands the text between the markers
to `calculator` and inserts ``=1813`` after the closing marker. That text is untrusted, so it is
never run as Python: it is parsed with ``ast.parse(mode="eval")`` and walked against an
allow-list (number literals, ``+ - * / **``, unary signs, parentheses). Size is bounded before
parsing (length, bracket depth), the tree is bounded (nodes, depth), each power is bounded before
it is computed (exponent, estimated digits), every value is bounded in digits, and a wall-clock
deadline backs it all up. Arithmetic is exact (`fractions.Fraction`): ``0.1+0.2`` is ``3/10``.
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass, fields
from decimal import Decimal, localcontext
from fractions import Fraction


@dataclass(frozen=True)
class CalcLimits:
    """Bounds on one calculation; any input is answered or refused within them."""

    max_chars: int = 200
    """Longest expression after stripping whitespace, checked before parsing."""
    max_nodes: int = 64
    """Most expression nodes (numbers and operations) in the parsed tree."""
    max_depth: int = 32
    """Deepest nesting, of brackets in the text (checked before parsing) and of the tree."""
    max_exponent: int = 64
    """Largest |exponent| of a power; the exponent must also be a whole number."""
    max_digits: int = 60
    """Most digits in any value's numerator or denominator, intermediates included."""
    timeout_s: float = 0.1
    """Wall-clock deadline for the whole calculation, checked at every node."""

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"CalcLimits.{field.name} must be positive, got {value!r}")


class CalcError(ValueError):
    """A refused or failed calculation; the message is one line, fit for the model's context."""


# Symbols a model copies from prose; the letter x is deliberately not a multiplication sign.
_NORMALISE = str.maketrans({"×": "*", "·": "*", "÷": "/", "\u2212": "-", "^": "**"})
_REFUSED = {  # node kind -> what the refusal calls it
    ast.Call: "calls are", ast.Attribute: "attribute access is", ast.Subscript: "subscripts are",
    ast.Compare: "comparisons are", ast.BoolOp: "boolean operators are", ast.Lambda: "lambdas are",
    ast.IfExp: "conditional expressions are", ast.NamedExpr: "assignment expressions are",
    ast.List: "lists are", ast.Tuple: "tuples are", ast.Set: "sets are", ast.Dict: "dicts are",
    ast.ListComp: "comprehensions are", ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are", ast.GeneratorExp: "comprehensions are",
    ast.JoinedStr: "f-strings are",
}
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)
_LITERAL_KINDS = {bool: "booleans", complex: "complex numbers", str: "strings", bytes: "bytes"}


def calculate(expr: str, limits: CalcLimits | None = None) -> int | Fraction:
    """Exact value of an arithmetic expression: an `int` when integral, else a `Fraction`."""
    limits = limits if limits is not None else CalcLimits()
    deadline = time.perf_counter() + limits.timeout_s
    if not isinstance(expr, str):
        raise CalcError(f"expression must be a str, got {type(expr).__name__}")
    text = expr.strip()
    if len(text) > limits.max_chars:
        raise CalcError(f"expression too long: {len(text)} characters, at most {limits.max_chars}")
    if not text:
        raise CalcError("empty expression")
    text = text.translate(_NORMALISE)
    depth = _bracket_depth(text)
    if depth > limits.max_depth:
        raise CalcError(
            f"expression too deeply nested: {depth} brackets, at most {limits.max_depth}"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalcError(f"not an arithmetic expression: {getattr(e, 'msg', e)}") from None
    _check(tree.body, limits)
    value = _eval(tree.body, limits, deadline, 1)
    return value.numerator if value.denominator == 1 else value


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def _check(root: ast.expr, limits: CalcLimits) -> None:
    """Refuse any node outside the allow-list, and trees with too many nodes."""
    nodes = 0
    # ast.walk is iterative and yields parents first, so a refused node is met before its children.
    for node in ast.walk(root):
        if not isinstance(node, ast.expr):
            continue
        nodes += 1
        if nodes > limits.max_nodes:
            raise CalcError(f"expression too large: more than {limits.max_nodes} nodes")
        if isinstance(node, ast.Constant):
            _literal(node.value)
        elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
            if not isinstance(node.op, _OPERATORS):
                name = type(node.op).__name__
                raise CalcError(f"operator {name} is not allowed; use + - * / ** ^")
        elif isinstance(node, ast.Name):
            raise CalcError(f"names are not allowed: {node.id!r}")
        else:
            raise CalcError(f"{_REFUSED.get(type(node), type(node).__name__ + ' is')} not allowed")


def _literal(value) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = _LITERAL_KINDS.get(type(value), f"{type(value).__name__} literals")
        raise CalcError(f"{kind} are not allowed: {repr(value)[:20]}")
    if isinstance(value, float):
        if not math.isfinite(value):  # 1e400 parses as inf
            raise CalcError(f"number out of range: {value}")
        return Fraction(repr(value))  # the decimal the model wrote: 0.1 is exactly 1/10
    return Fraction(value)


def _eval(node: ast.expr, limits: CalcLimits, deadline: float, depth: int) -> Fraction:
    if depth > limits.max_depth:
        raise CalcError(f"expression too deeply nested: more than {limits.max_depth} levels")
    if time.perf_counter() > deadline:
        raise CalcError(f"calculation took longer than {limits.timeout_s} s")
    if isinstance(node, ast.Constant):
        return _bounded(_literal(node.value), limits)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, limits, deadline, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    left = _eval(node.left, limits, deadline, depth + 1)
    right = _eval(node.right, limits, deadline, depth + 1)
    if isinstance(node.op, ast.Add):
        return _bounded(left + right, limits)
    if isinstance(node.op, ast.Sub):
        return _bounded(left - right, limits)
    if isinstance(node.op, ast.Mult):
        return _bounded(left * right, limits)
    if isinstance(node.op, ast.Div):
        if right == 0:
            raise CalcError("division by zero")
        return _bounded(left / right, limits)
    return _bounded(_power(left, right, limits), limits)


def _power(base: Fraction, exponent: Fraction, limits: CalcLimits) -> Fraction:
    if exponent.denominator != 1:
        raise CalcError(f"exponent must be a whole number, got {format_number(exponent)}")
    n = exponent.numerator
    if abs(n) > limits.max_exponent:
        raise CalcError(f"exponent too large: {n}, at most {limits.max_exponent} in absolute value")
    if base == 0:
        if n < 0:
            raise CalcError("zero to a negative power")
        return base**n
    # Estimate the digits before computing, so a huge power is refused without being built.
    digits = abs(n) * max(math.log10(abs(base.numerator)), math.log10(base.denominator))
    if digits > limits.max_digits + 1:
        raise CalcError(f"power has about {digits:.0f} digits, at most {limits.max_digits}")
    return base**n


def _bounded(value: Fraction, limits: CalcLimits) -> Fraction:
    bound = 10**limits.max_digits
    if abs(value.numerator) >= bound:
        raise CalcError(f"number too large: more than {limits.max_digits} digits")
    if value.denominator >= bound:
        raise CalcError(f"number too fine: denominator of more than {limits.max_digits} digits")
    return value


def format_number(value: int | Fraction) -> str:
    """Integers exactly; other fractions as decimals to 10 significant digits, zeros stripped."""
    if isinstance(value, bool) or not isinstance(value, (int, Fraction)):
        raise TypeError(f"value must be an int or Fraction, got {type(value).__name__}")
    if value.denominator == 1:
        return str(value.numerator)
    whole_digits = len(str(abs(value.numerator) // value.denominator))
    with localcontext() as ctx:
        ctx.prec = max(10, whole_digits)  # never round away digits of the whole part
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass
class ToolResult:
    """One tool call as the orchestrator records it."""

    name: str
    """The tool's name, e.g. "calculator"."""
    input: str
    """The text the model wrote between the markers."""
    ok: bool
    """Whether the tool produced a value."""
    output: str
    """The formatted value, or the one-line error message."""
    seconds: float
    """Wall-clock time the call took."""

    @property
    def insertion(self) -> str:
        """The text inserted after ``[/CALC]`` in the model's context."""
        return "=" + self.output if self.ok else "=[error: " + self.output + "]"


def calculator(expr: str, limits: CalcLimits | None = None) -> ToolResult:
    """Run `calculate` as a tool: never raises for bad input, reports errors in the result."""
    start = time.perf_counter()
    try:
        ok, output = True, format_number(calculate(expr, limits))
    except ValueError as e:  # CalcError, or Python's own limits on number size
        ok, output = False, str(e)
    except RecursionError:
        ok, output = False, "not an arithmetic expression: too deeply nested"
    except MemoryError:
        ok, output = False, "not an arithmetic expression: too large"
    text = expr if isinstance(expr, str) else repr(expr)
    return ToolResult("calculator", text, ok, output, time.perf_counter() - start)
