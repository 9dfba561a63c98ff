"""A calculator tool: arithmetic on numbers with Python's meaning of each operator, parsed with
`ast` and walked by hand, never `eval`.

Allowed: int and float literals, + - * / // % **, unary + and -, parentheses. Everything else
(names, calls, attributes, strings, `^`, comparisons) is refused with a one-line reason. Sizes are
bounded before they are computed: `9**9**9` is refused from the operands' bit lengths, not
discovered by running out of memory.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 1000
MAX_INT_BITS = 4096
"""Largest integer (about 1,233 digits) an operand or a result may have."""

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_SYMBOL = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@"}


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is the reason, without the "error: "."""


def _check_size(value: int | float) -> int | float:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large (not a finite float)")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    """`base ** exponent`, refused before computing when the integer result could not fit."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # |base| >= 2 ** (bit_length - 1), so the result has at least this many bits.
        if (abs(base).bit_length() - 1) * exponent + 1 > MAX_INT_BITS:
            raise CalculatorError(f"result too large (over {MAX_INT_BITS} bits)")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        # bool is an int subclass, so check the exact types.
        if type(node.value) not in (int, float):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}"[:120])
        assert isinstance(node.value, (int, float))  # for mypy: the exact-type check above is one it cannot read
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and type(node.op) in _SYMBOL:
        hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
        raise CalculatorError(f"operator {_SYMBOL[type(node.op)]} is not allowed{hint}")
    raise CalculatorError(f"{type(node).__name__.lower()} is not allowed; only numbers, + - * / // % ** and parentheses")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; raises CalculatorError with the reason."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise CalculatorError(f"not an arithmetic expression ({type(exc).__name__})") from None
    try:
        return _evaluate(tree)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large for a float") from None
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def calculate(expression: str) -> str:
    """The calculator tool: the value as Python prints it ("53", "3.5"), or "error: <reason>"."""
    try:
        return str(evaluate(expression))
    except CalculatorError as exc:
        return f"error: {exc}"
