"""Tools the orchestrator calls mid-generation: the `ToolSpec` protocol, its two call formats, and
the safe calculator.

A tool is a name, a way its calls are written in model text, and a function (`ToolSpec`):

- `MarkupTool`: one string argument between two markers, the result inserted right after the
  closing one (``[CALC]37*49[/CALC]`` then ``=1813``; the default world's format, which
  `orchestrator.world` wires up);
- `JsonTool`: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5 and
  most tool-tuned chat models), the result inserted after it in ``<tool_response>`` tags.

The graph's `Tool` node finds a call with `find`, runs it with `run` and inserts
`insertion(call, result)`; any object with those three methods and a `name` is a tool.

The calculator: a small model writes ``[CALC]37*49[/CALC]``; the text between the markers goes
to `calculator`, and ``=1813`` is inserted after the closing marker. That text is untrusted, so it is
never run as Python: it is parsed with ``ast.parse(mode="eval")`` and walked against an
allow-list (number literals, ``+ - * / **``, unary signs, parentheses). Size is bounded before
parsing (length, bracket depth), the tree is bounded (nodes, depth), each power is bounded before
it is computed (exponent, estimated digits), every value is bounded in digits, and a wall-clock
deadline backs it all up. Arithmetic is exact (`fractions.Fraction`): ``0.1+0.2`` is ``3/10``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable


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
    """The call's argument text: what the model wrote between the markers, or the JSON arguments."""
    ok: bool
    """Whether the tool produced a value."""
    output: str
    """The formatted value, or the one-line error message."""
    seconds: float
    """Wall-clock time the call took."""

    @property
    def insertion(self) -> str:
        """The result as a `MarkupTool` with the default `=` prefix inserts it after the call."""
        return _marked(self, "=")


def _marked(result: ToolResult, prefix: str) -> str:
    return prefix + result.output if result.ok else prefix + "[error: " + result.output + "]"


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool, found in model text."""

    tool: str
    """the tool's name"""
    arguments: Any
    """what the function receives: the text between the markers (stripped) for a `MarkupTool`,
    the parsed JSON arguments (a dict, or the raw text when it is not a JSON object) for a `JsonTool`"""
    written: str
    """the call as the model wrote it, inserted back into the sequence before the result"""


@runtime_checkable
class ToolSpec(Protocol):
    """A tool the graph's `Tool` node can call (see the module docstring)."""

    name: str

    def find(self, text: str) -> ToolCall | None:
        """The first call of this tool written in `text`, or None."""

    def run(self, call: ToolCall) -> ToolResult:
        """Run the call; bad input is reported in the result (`ok=False`), not raised."""

    def insertion(self, call: ToolCall, result: ToolResult) -> str:
        """The text put into the sequence: the call as written, then its result."""


def _timed(name: str, shown: str, fn: Callable, *args, **kw) -> ToolResult:
    """Run a tool function: a `ToolResult` is kept as it is, any other value becomes the output;
    a ValueError or TypeError (bad arguments) becomes an error result."""
    start = time.perf_counter()
    try:
        value = fn(*args, **kw)
    except (ValueError, TypeError) as e:
        return ToolResult(name, shown, False, str(e), time.perf_counter() - start)
    if isinstance(value, ToolResult):
        return value
    return ToolResult(name, shown, True, str(value), time.perf_counter() - start)


@dataclass(frozen=True)
class MarkupTool:
    """A function of one string argument, called as `{open}argument{close}` in the text; the
    result goes right after the call: `{result_prefix}value`, or `{result_prefix}[error: message]`."""

    name: str
    fn: Callable[[str], Any]
    """argument text -> a `ToolResult`, or a value (str() is inserted)"""
    open: str
    close: str
    result_prefix: str = "="

    def __post_init__(self):
        for f in ("name", "open", "close"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(f"MarkupTool.{f} must be a non-empty string, got {getattr(self, f)!r}")
        if not callable(self.fn):
            raise TypeError(f"MarkupTool {self.name!r}: fn must be callable, got {self.fn!r}")

    def find(self, text: str) -> ToolCall | None:
        m = re.search(re.escape(self.open) + r"(.*?)" + re.escape(self.close), text, re.S)
        return ToolCall(self.name, m.group(1).strip(), m.group(0)) if m else None

    def run(self, call: ToolCall) -> ToolResult:
        return _timed(self.name, call.arguments, self.fn, call.arguments)

    def insertion(self, call: ToolCall, result: ToolResult) -> str:
        return call.written + _marked(result, self.result_prefix)


@dataclass(frozen=True)
class JsonTool:
    """A function of keyword arguments, called as `{open}{"name": NAME, "arguments": {...}}{close}`
    (Hermes-style); the result goes after the call as `result.format(output=...)`, an error as
    `result.format(output="error: " + message)`."""

    name: str
    fn: Callable[..., Any]
    """keyword arguments -> a `ToolResult`, or a value (str() is inserted)"""
    open: str = "<tool_call>"
    close: str = "</tool_call>"
    result: str = "<tool_response>{output}</tool_response>"

    def __post_init__(self):
        for f in ("name", "open", "close"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ValueError(f"JsonTool.{f} must be a non-empty string, got {getattr(self, f)!r}")
        if not callable(self.fn):
            raise TypeError(f"JsonTool {self.name!r}: fn must be callable, got {self.fn!r}")

    def find(self, text: str) -> ToolCall | None:
        """The first call block that names this tool (a block that is not JSON is nobody's call)."""
        for m in re.finditer(re.escape(self.open) + r"(.*?)" + re.escape(self.close), text, re.S):
            try:
                body = json.loads(m.group(1))
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("name") == self.name:
                args = body.get("arguments", {})
                if isinstance(args, str):  # OpenAI sends arguments as JSON text
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass
                return ToolCall(self.name, args, m.group(0))
        return None

    def run(self, call: ToolCall) -> ToolResult:
        args = call.arguments
        shown = json.dumps(args) if isinstance(args, dict) else str(args)
        if not isinstance(args, dict):
            return ToolResult(self.name, shown, False, f"arguments must be a JSON object, got {shown[:40]!r}", 0.0)
        return _timed(self.name, shown, self.fn, **args)

    def insertion(self, call: ToolCall, result: ToolResult) -> str:
        return call.written + self.result.format(output=result.output if result.ok else "error: " + result.output)


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
