"""The calculator tool against references built with `Fraction` arithmetic, never `eval`."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from orchestrator.tools import (
    CalcError,
    CalcLimits,
    ToolResult,
    calculate,
    calculator,
    format_number,
)

_SYMBOLS = {"+": "+", "-": "-−", "*": "*×·", "/": "/÷", "**": ["**", "^"]}  # spellings
# Python precedence levels: + - (1), * / (2), unary (3), ** (4), atoms and parentheses (5).
_LEVEL = {"+": 1, "-": 1, "*": 2, "/": 2, "**": 4}
# The least level a (left, right) operand may have without parentheses; ** binds right to left.
_OPERAND_LEVELS = {"+": (1, 2), "-": (1, 2), "*": (2, 3), "/": (2, 3), "**": (5, 3)}


def _wrap(text: str, level: int, needed: int) -> str:
    return text if level >= needed else f"({text})"


def _random_expr(rng: random.Random, depth: int) -> tuple[str, Fraction | None, int]:
    """(text, exact value or None for a math error, precedence level), with minimal parentheses."""
    if depth == 0 or rng.random() < 0.25:
        n = rng.randint(0, 99)
        return str(n), Fraction(n), 5
    kind = rng.choice(["+", "-", "*", "/", "**", "neg", "paren"])
    if kind == "paren":
        text, value, _ = _random_expr(rng, depth - 1)
        return f"({text})", value, 5
    if kind == "neg":
        text, value, level = _random_expr(rng, depth - 1)
        sign = rng.choice(_SYMBOLS["-"])
        return sign + _wrap(text, level, 3), (None if value is None else -value), 3
    left, a, left_level = _random_expr(rng, depth - 1)
    if kind == "**":  # a small whole exponent, possibly negative, so values stay small
        e = rng.randint(-3, 3)
        right, b, right_level = (str(e), Fraction(e), 5) if e >= 0 else (f"-{-e}", Fraction(e), 3)
    else:
        right, b, right_level = _random_expr(rng, depth - 1)
    need_left, need_right = _OPERAND_LEVELS[kind]
    space = rng.choice(["", " "])
    text = f"{_wrap(left, left_level, need_left)}{space}{rng.choice(_SYMBOLS[kind])}{space}"
    text += _wrap(right, right_level, need_right)
    if a is None or b is None:
        return text, None, _LEVEL[kind]
    if kind == "+":
        value = a + b
    elif kind == "-":
        value = a - b
    elif kind == "*":
        value = a * b
    elif kind == "/":
        value = a / b if b != 0 else None
    else:
        value = a**b if (a != 0 or b >= 0) else None
    return text, value, _LEVEL[kind]


def _small(value: Fraction | None) -> bool:
    return value is None or max(abs(value.numerator), value.denominator) < 10**30


def test_random_expressions_match_fraction_reference():
    rng = random.Random(1234)
    checked = errors = fractions = negatives = 0
    while checked < 400:
        text, expected, _ = _random_expr(rng, 4)
        if not _small(expected):
            continue
        checked += 1
        if expected is None:
            errors += 1
            with pytest.raises(CalcError, match="division by zero|zero to a negative power"):
                calculate(text)
            continue
        got = calculate(text)
        assert got == expected, text
        assert isinstance(got, int) == (expected.denominator == 1), text
        fractions += expected.denominator != 1
        negatives += expected < 0
    assert errors >= 3 and fractions > 50 and negatives > 50  # the sample covers every outcome


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("37*49", 37 * 49),
        ("2^10", 2**10),
        ("7÷2", Fraction(7, 2)),
        ("−3×4", -3 * 4),
        ("2·3", 2 * 3),
        ("  2 + 3*4 ", 2 + 3 * 4),
        ("-2**2", -(2**2)),
        ("2**3**2", 2 ** (3**2)),
        ("2^3^2", 2 ** (3**2)),
        ("7-2-1", 7 - 2 - 1),
        ("2*-3", 2 * -3),
        ("+5", 5),
        ("1/2/2", Fraction(1, 2) / 2),
        ("2**-2", Fraction(1, 4)),
        ("(2/3)**3", Fraction(2, 3) ** 3),
        ("2**(4/2)", 2**2),
        ("0.1+0.2", Fraction("0.1") + Fraction("0.2")),
        ("1e5", 10**5),
        ("2.5e-3*4", Fraction("2.5e-3") * 4),
        ("1_000+1", 1000 + 1),
        ("10**59", 10**59),
    ],
)
def test_values(expr, expected):
    got = calculate(expr)
    assert got == expected
    assert type(got) is (int if Fraction(expected).denominator == 1 else Fraction)


# (expression, what the refusal must say)
_REFUSALS = [
    ("__import__('os')", "calls are not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("a+1", "names are not allowed: 'a'"),
    ("print(1)", "calls are not allowed"),
    ("[1,2]", "lists are not allowed"),
    ("(1,2)[0]", "subscripts are not allowed"),
    ("1 if 1 else 2", "conditional expressions are not allowed"),
    ("lambda: 1", "lambdas are not allowed"),
    ("[x for x in (1,)]", "comprehensions are not allowed"),
    ("1 < 2", "comparisons are not allowed"),
    ("1 and 2", "boolean operators are not allowed"),
    ("'ab'*3", "strings are not allowed"),
    ("True+1", "booleans are not allowed"),
    ("1j", "complex numbers are not allowed"),
    ("7//2", "operator FloorDiv is not allowed"),
    ("7%2", "operator Mod is not allowed"),
    ("~1", "operator Invert is not allowed"),
    ("2x3", "not an arithmetic expression"),
    ("1+", "not an arithmetic expression"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("1/0", "division by zero"),
    ("1/(2-2)", "division by zero"),
    ("0**-1", "zero to a negative power"),
    ("2**0.5", "exponent must be a whole number"),
    ("9**9**9**9", "exponent too large"),
    ("2**100000", "exponent too large"),
    ("10**64**2", "exponent too large"),
    ("(10**50)**60", "power has about 3000 digits, at most 60"),
    ("10**59*10**59", "number too large"),
    ("1" * 61, "number too large"),
    ("1e308*10", "number too large"),
    ("1e400", "number out of range"),
    ("1e-61", "number too fine"),
    ("(1/10)**61", "number too fine"),
    ("1" * 300, "expression too long"),
    ("(" * 40 + "1" + ")" * 40, "too deeply nested"),
    ("-" * 40 + "1", "too deeply nested"),
    ("+".join(["1"] * 40), "more than 64 nodes"),
]


@pytest.mark.parametrize("expr, reason", _REFUSALS)
def test_refusals_are_clear_and_fast(expr, reason):
    start = time.perf_counter()
    with pytest.raises(CalcError, match=reason) as info:
        calculate(expr)
    assert time.perf_counter() - start < 0.05  # refusal must not compute first
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("expr, reason", _REFUSALS)
def test_calculator_reports_refusals_without_raising(expr, reason):
    result = calculator(expr)
    assert not result.ok and reason in result.output
    assert result.insertion == f"=[error: {result.output}]"
    assert result.name == "calculator" and result.input == expr and result.seconds >= 0


def test_calculator_success():
    result = calculator("37*49")
    assert result == ToolResult("calculator", "37*49", True, str(37 * 49), result.seconds)
    assert result.insertion == "=1813"
    assert calculator("7÷2").insertion == "=3.5"


def test_calculator_never_raises_on_odd_input():
    assert not calculator(None).ok
    assert not calculator("\x00").ok
    assert not calculator("(" * 100_000, CalcLimits(max_chars=10**6)).ok


def test_depth_is_checked_before_parsing():
    deep = "(" * 10_000 + "1" + ")" * 10_000
    start = time.perf_counter()
    with pytest.raises(CalcError, match="too deeply nested: 10000 brackets"):
        calculate(deep, CalcLimits(max_chars=10**6))
    assert time.perf_counter() - start < 0.05


def test_power_digits_are_estimated_before_computing():
    limits = CalcLimits(max_exponent=10**9)
    start = time.perf_counter()
    with pytest.raises(CalcError, match="power has about 9.* digits"):
        calculate("9**999999999", limits)
    assert time.perf_counter() - start < 0.05
    assert calculate("10**60", CalcLimits(max_digits=61)) == 10**60  # the estimate is not too eager
    with pytest.raises(CalcError, match="number too large"):
        calculate("10**60")


def test_max_exponent_limit():
    limits = CalcLimits(max_exponent=3)
    assert calculate("2**3", limits) == 2**3
    assert calculate("2**-3", limits) == Fraction(1, 2**3)
    with pytest.raises(CalcError, match="exponent too large: 4, at most 3"):
        calculate("2**4", limits)


def test_timeout():
    with pytest.raises(CalcError, match="took longer than"):
        calculate("1+1", CalcLimits(timeout_s=1e-9))


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="CalcLimits.max_chars must be positive, got 0"):
        CalcLimits(max_chars=0)


@pytest.mark.parametrize(
    "value, text",
    [(1813, "1813"), (Fraction(1, 3), "0.3333333333"), (Fraction(2, 3), "0.6666666667"),
     (Fraction(5, 2), "2.5"), (Fraction(-7, 4), "-1.75"), (Fraction(4, 2), "2"), (-12, "-12")],
)
def test_format_number_examples(value, text):
    assert format_number(value) == text


def test_format_number_is_close_and_short():
    rng = random.Random(5)
    for _ in range(300):
        value = Fraction(rng.randint(-10**8, 10**8), rng.randint(1, 10**6))
        text = format_number(value)
        assert float(text) == pytest.approx(float(value), rel=1e-9, abs=0)
        digits = text.lstrip("-").replace(".", "").lstrip("0")
        whole = len(str(abs(value.numerator) // value.denominator))
        assert len(digits) <= max(10, whole)
    with pytest.raises(TypeError):
        format_number(1.5)
