"""`txcl fmt`: the one canonical text of a TXCL file, printed from its syntax tree.

Canonical form: upper-case keywords; one statement per line; one space around binary
operators; paths under `_txc` in their `@` form; segments quoted only when they must be;
strings as JSON; regexes with `/` escaped; only the parentheses the tree needs; one blank
line between rules; comments kept (own-line comments stay before the statement that
follows them, trailing comments stay trailing after two spaces); a final newline.

Like OPA's `fmt --check-result`, format_source re-parses what it printed and refuses to
return text whose rules differ from the input's.
"""

from __future__ import annotations

import json
import re
from typing import Final

from txcl import ast
from txcl.envelope import path_text
from txcl.errors import Problem, TxclError

__all__ = ["InternalFormatError", "format_expr", "format_file", "format_path", "format_source"]

_SLASH_OR_ESCAPE: Final = re.compile(r"\\.|/", re.DOTALL)

# Binding strength, loosest first, as in the grammar: OR < AND < NOT < comparison < + < atom.
_OR, _AND, _NOT, _CMP, _SUM, _ATOM = range(1, 7)


class InternalFormatError(TxclError):
    """fmt printed text that parses to different rules: a bug in fmt, never in the input."""

    def __init__(self, name: str) -> None:
        message = f"{name}: formatting would change the rules; please report this"
        super().__init__(Problem("txcl_internal_error", message))


def format_source(source: str, name: str) -> str:
    """The canonical text of a TXCL file. Raises TxclSyntaxError when it does not parse."""
    from txcl.parser import parse  # not at import: the compiler imports this module

    tree = parse(source, name)
    text = format_file(tree)
    if ast.strip_pos(parse(text, name)) != ast.strip_pos(tree):
        raise InternalFormatError(name)
    return text


def format_file(file: ast.File) -> str:
    """Print a parsed file, comments included, in canonical form."""
    statements: list[tuple[ast.Stmt, bool]] = []
    for rule in file.rules:
        body: tuple[ast.Stmt, ...] = (*rule.whens, *rule.body)
        statements.extend((stmt, index == 0) for index, stmt in enumerate(body))
    statement_lines = {stmt.pos.line for stmt, _ in statements}
    trailing = {c.pos.line: c for c in file.comments if c.pos.line in statement_lines}
    own_line = sorted(
        (c for c in file.comments if c.pos.line not in statement_lines), key=lambda c: c.pos
    )

    out: list[str] = []
    pending = 0  # index of the next own-line comment to print

    def comment_block(before_line: int | None) -> list[ast.Comment]:
        nonlocal pending
        start = pending
        while pending < len(own_line) and (
            before_line is None or own_line[pending].pos.line < before_line
        ):
            pending += 1
        return own_line[start:pending]

    def emit_comments(block: list[ast.Comment]) -> None:
        for index, comment in enumerate(block):
            if index and comment.pos.line - block[index - 1].pos.line > 1:
                out.append("")  # a blank line that separated comments stays, as one
            out.append(f"#{comment.text}")

    for index, (stmt, starts_rule) in enumerate(statements):
        block = comment_block(stmt.pos.line)
        if starts_rule and index:
            out.append("")
        emit_comments(block)
        if block and starts_rule and stmt.pos.line - block[-1].pos.line > 1:
            out.append("")
        line = format_statement(stmt)
        comment = trailing.get(stmt.pos.line)
        out.append(f"{line}  #{comment.text}" if comment else line)

    block = comment_block(None)
    if block and statements and block[0].pos.line - statements[-1][0].pos.line > 1:
        out.append("")
    emit_comments(block)
    return "\n".join(out) + "\n" if out else ""


def format_statement(stmt: ast.Stmt) -> str:
    if isinstance(stmt, ast.When):
        return f"WHEN {format_expr(stmt.expr)}"
    if isinstance(stmt, ast.Set):
        return f"SET {format_path(stmt.target)} = {format_expr(stmt.value)}"
    if isinstance(stmt, ast.Exec):
        return f"EXEC {_string(stmt.uri)}"
    if isinstance(stmt, ast.With):
        return f"WITH {stmt.key} = {format_expr(stmt.value)}"
    raise TypeError(f"not a statement: {stmt!r}")


def format_path(path: ast.Path) -> str:
    """`@a.b` for paths under _txc, else the bare dotted form; quoted segments as JSON."""
    return path_text(path.segments, at=True)


def _string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _regex(regex: ast.Regex) -> str:
    escaped = _SLASH_OR_ESCAPE.sub(
        lambda m: "\\/" if m.group() == "/" else m.group(), regex.pattern
    )
    return f"/{escaped}/{regex.flags}"


def _literal(value: str | int | float | bool | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    return repr(value)  # int, or the shortest float text that reads back the same


def format_expr(expr: ast.Expr) -> str:
    """An expression with only the parentheses its tree needs."""
    return _expr(expr)[0]


def _expr(expr: ast.Expr) -> tuple[str, int]:
    """The text of `expr` and how tightly it binds."""
    if isinstance(expr, ast.Or):
        return f"{_operand(expr.left, _OR)} OR {_operand(expr.right, _AND)}", _OR
    if isinstance(expr, ast.And):
        return f"{_operand(expr.left, _AND)} AND {_operand(expr.right, _NOT)}", _AND
    if isinstance(expr, ast.Not):
        return f"NOT {_operand(expr.operand, _NOT)}", _NOT
    if isinstance(expr, ast.Compare):
        return f"{_operand(expr.left, _SUM)} {expr.op} {_operand(expr.right, _SUM)}", _CMP
    if isinstance(expr, ast.Match):
        op = "!=~" if expr.negated else "=~"
        return f"{_operand(expr.left, _SUM)} {op} {_regex(expr.regex)}", _CMP
    if isinstance(expr, ast.Add):
        return f"{_operand(expr.left, _SUM)} + {_operand(expr.right, _ATOM)}", _SUM
    if isinstance(expr, ast.Path):
        return format_path(expr), _ATOM
    if isinstance(expr, ast.JsonPath):
        return expr.text, _ATOM
    if isinstance(expr, ast.Literal):
        return _literal(expr.value), _ATOM
    if isinstance(expr, ast.Regex):
        return _regex(expr), _ATOM
    if isinstance(expr, ast.ListLit):
        return "[" + ", ".join(format_expr(item) for item in expr.items) + "]", _ATOM
    if isinstance(expr, ast.Call):
        return f"{expr.name}(" + ", ".join(format_expr(a) for a in expr.args) + ")", _ATOM
    raise TypeError(f"not an expression: {expr!r}")


def _operand(expr: ast.Expr, needs: int) -> str:
    """`expr` where a binding of at least `needs` is required; parenthesised if looser."""
    text, binds = _expr(expr)
    return text if binds >= needs else f"({text})"
