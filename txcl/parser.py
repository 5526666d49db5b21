"""TXCL text -> ast.File, with labelled, positioned syntax errors.

The grammar lives in grammar/txcl.lark. A file is parsed in one go with the grammar's
`file` rule, by txcl/lark_fast.py when it sets up, else by stock lark. Statements are one
per line, so a file with any error is parsed again line by line with the `line` rule: a bad
line is reported and the next line is parsed afresh, so one mistake never hides the next,
and every message comes from that one path. Either way the cost stays linear in the size
of the file. The statements are then grouped into rules here (WHENs, then a body).

Nothing after this module sees a lark Tree: the transformer below builds ast nodes.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import importlib.resources
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Final, TypeVar

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from txcl import ast, lark_fast
from txcl.errors import Pos, Problem, TxclSyntaxError, caret_context, source_lines
from txcl.lark_fast import Scanned

__all__ = ["MAX_NESTING", "SYNTAX_EXAMPLES", "caret_context", "parse", "parse_expression"]

CODE: Final = "txcl_parse_error"
_N = TypeVar("_N", bound=ast.Expr)
_log = logging.getLogger(__name__)

# Brackets and operators may nest this deep; deeper input is refused with a position
# instead of exhausting the stack of the transformer, the formatter or the compiler.
MAX_NESTING: Final = 100

# After this many problems in one file, stop: the rest is noise.
MAX_PROBLEMS: Final = 50

# Integers longer than this are refused (Python cannot even print them back by default).
_MAX_INT_DIGITS: Final = 1000
_MAX_INDEX_DIGITS: Final = 18

# Malformed lines with a plain-words label each. _label finds the example whose parser state
# matches an error, as lark's match_examples does; when a line confuses someone, add it here.
SYNTAX_EXAMPLES: Final[dict[str, list[str]]] = {
    "unknown keyword; a statement starts with WHEN, SET, EXEC or WITH": [
        "FOO",
        "IF @a.b == 1",
        "@a.b = 1",
        '"x"',
        "1",
        "(",
        "=",
        "[",
        "$.a",
        "AND",
    ],
    "missing '=' in SET": ["SET @a.b 1", "SET @a.b", 'SET @a.b "x"', "SET @a.b == 1"],
    "SET needs a path such as @lmtp.res.code": [
        "SET 1 = 2",
        'SET "x" = 1',
        "SET $.a = 1",
        "SET x = 1",
        "SET",
        "SET = 1",
        "SET (@a.b) = 1",
    ],
    "WITH needs a key such as timeout": ["WITH = 1", 'WITH "x" = 1', "WITH a.b = 1", "WITH"],
    "missing '=' in WITH": ['WITH timeout "5s"', "WITH timeout", "WITH timeout == 1"],
    'EXEC needs a quoted op URI like "op://ARCHIVE"': [
        "EXEC op://ARCHIVE",
        "EXEC ARCHIVE",
        "EXEC @a.b",
        "EXEC 1",
        "EXEC",
        "EXEC (",
    ],
    "missing expression": [
        "WHEN",
        "SET @a.b =",
        "WITH x =",
        "WHEN @a.b ==",
        "WHEN @a.b <",
        "WHEN @a.b IN",
        "WHEN @a.b NOT IN",
        "WHEN NOT",
        "WHEN @a.b AND",
        "WHEN @a.b OR",
        "WHEN @a.b +",
        "WHEN (",
        "WHEN f(",
        "WHEN f(@a.b,",
        "SET @a.b = [1,",
        "WHEN ==",
        "WHEN @a.b == )",
    ],
    "=~ and !=~ need a regex such as /pattern/i on their right": [
        'WHEN @a.b =~ "x"',
        "WHEN @a.b !=~ x.y",
        "WHEN @a.b =~ 1",
        "WHEN @a.b =~",
        "WHEN @a.b !=~",
        "WHEN @a.b =~ (/x/)",
    ],
    "missing ')'": ["WHEN (@a.b == 1", "WHEN len(@a.b", "WHEN f(@a.b 1", "WHEN (@a.b 1"],
    "missing ']'": ["SET @a.b = [1, 2", "SET @a.b = [1 2"],
    "comparisons do not chain; join them with AND": [
        "WHEN @a.b == 1 == 2",
        "WHEN 1 < @a.b < 3",
        "WHEN @a.b =~ /x/ == 1",
        "WHEN @a.b IN [1] IN [2]",
        "WHEN @a.b == 1 =~ /x/",
    ],
    "one statement per line": [
        "WHEN @a.b == 1 WHEN @b.c == 2",
        "SET @a.b = 1 SET @b.c = 2",
        'EXEC "op://A" EXEC "op://B"',
        'EXEC "op://A" WITH x = 1',
        "WITH a = 1 SET @b.c = 2",
    ],
    "missing operator between two values": [
        'WHEN @a.b "x"',
        "WHEN @a.b @c.d",
        "WHEN @a.b 1",
        "WHEN @a.b (1)",
        "WHEN @a.b [1]",
        "SET @a.b = 1 2",
        "WHEN @a.b true",
        "WHEN @a.b x.y",
        'EXEC "op://A" 1',
        'EXEC "op://A" "x"',
    ],
    "NOT after a value starts NOT IN; to negate a comparison, put NOT first (NOT @a == 1)": [
        "WHEN @a.b NOT",
        "WHEN @a.b NOT 1",
        "WHEN @a.b NOT == 1",
        "WHEN @a.b NOT =~ /x/",
        "WHEN @a.b NOT NOT",
    ],
    "a regex cannot stand alone; match it with =~ or !=~": [
        "WHEN /x/",
        "SET @a.b = /x/",
        "WHEN @a.b == /x/",
        "WHEN NOT /x/",
        "WITH x = /x/",
        "WHEN @a.b =~ /x/ /y/",
    ],
}

# How expected terminals read in an error message.
_FRIENDLY: Final[dict[str, str]] = {
    "$END": "end of line",
    "WHEN": "WHEN",
    "SET": "SET",
    "EXEC": "EXEC",
    "WITH": "WITH",
    "_OR": "OR",
    "_AND": "AND",
    "NOT": "NOT",
    "_IN": "IN",
    "TRUE": "true",
    "FALSE": "false",
    "NULL": "null",
    "STRING": "a string",
    "NUMBER": "a number",
    "REGEX": "a regex",
    "AT_PATH": "an @path",
    "BARE_PATH": "a path",
    "JSONPATH": "a $ path",
    "NAME": "a name",
    "_LPAR": "'('",
    "_RPAR": "')'",
    "LSQB": "'['",
    "_RSQB": "']'",
}
_KEYWORDS: Final = frozenset({"WHEN", "SET", "EXEC", "WITH", "_OR", "_AND", "NOT", "_IN"})
_VALUE_STARTS: Final = frozenset(
    {"AT_PATH", "BARE_PATH", "JSONPATH", "STRING", "NUMBER", "TRUE", "FALSE", "NULL"}
    | {"LSQB", "_LPAR", "NAME", "NOT"}
)
_OPERATORS: Final = frozenset(
    {"==", "!=", "<", "<=", ">", ">=", "=~", "!=~", "+", "IN", "NOT IN"}
)

_SEGMENT = re.compile(r'[A-Za-z0-9_-]+|\*|"(?:[^"\\]|\\.)*"')
_REGEX_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_CHARACTER_HINTS: Final = {
    "&": "; write AND",
    "|": "; write OR",
    "'": '; strings take double quotes: "text"',
    "!": "; write NOT, != or !=~",
    "=": "; compare with ==, assign with SET path = value",
}


class _Refused(Exception):
    """A line that is not TXCL: a syntax error, or a token the grammar accepts but the
    language does not (a bad escape, a deep nest)."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


# --- the parser, built once ----------------------------------------------------------------


def grammar_text() -> str:
    """The grammar: from the installed package `txcl.grammar`, else from the source tree."""
    try:
        return importlib.resources.files("txcl.grammar").joinpath("txcl.lark").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        source_tree = FsPath(__file__).resolve().parent.parent / "grammar" / "txcl.lark"
        return source_tree.read_text("utf-8")


@dataclass(slots=True)
class _LineScan:
    """The line being parsed, and what the lexer and the transformer record about it."""

    name: str
    lineno: int  # of the text's first line (a token's own line counts from 1)
    column_shift: int = 0  # parse_expression parses its text behind a "WHEN "
    comments: list[Token | Scanned] = field(default_factory=list)
    brackets: int = 0
    depths: dict[int, int] = field(default_factory=dict)  # id(node) -> nesting depth


_SCAN: contextvars.ContextVar[_LineScan] = contextvars.ContextVar("txcl_line_scan")
_TOO_DEEP: Final = f"expression nested too deeply (more than {MAX_NESTING} levels)"


def _on_comment(token: Token | Scanned) -> Token | Scanned:
    _SCAN.get().comments.append(token)
    return token


def _on_open(token: Token) -> Token:
    scan = _SCAN.get()
    scan.brackets += 1
    if scan.brackets > MAX_NESTING:
        raise _Refused(_TOO_DEEP, token.column or 1)
    return token


def _on_close(token: Token) -> Token:
    _SCAN.get().brackets -= 1
    return token


_LEXER_CALLBACKS: Final = {
    "COMMENT": _on_comment,
    "_LPAR": _on_open,
    "LSQB": _on_open,
    "_RPAR": _on_close,
    "_RSQB": _on_close,
}


def _lark(start: str) -> Lark:
    """A stock LALR parser of the grammar from `start`. It runs the transformer as it
    reduces, so no parse tree is built and nothing recurses, however deeply the input nests."""
    return Lark(
        grammar_text(),
        start=start,
        parser="lalr",
        lexer="basic",
        transformer=_ToAst(),
        maybe_placeholders=False,
        lexer_callbacks=_LEXER_CALLBACKS,
    )


@functools.cache
def parser() -> Lark:
    """The parser of one line, built on first use."""
    return _lark("line")


def _parse_line(scan: _LineScan, text: str) -> ast.Stmt | None:
    reset = _SCAN.set(scan)
    try:
        # lark types parse() as returning a Tree, but our transformer returns the statement.
        return parser().parse(text)  # type: ignore[return-value]
    finally:
        _SCAN.reset(reset)


# A file that uses every rule of the grammar: the fast path must build what lark builds.
_SAMPLE: Final = """\
# every rule once

WHEN @a.b == 1 AND NOT x.y != "s" OR $.c < 2.5
WHEN @a <= [1, true, false, null] AND f(@a, 1) > 0 AND @a >= 1 + 2  # trailing
WHEN @a IN [] AND @a NOT IN [2] AND @a =~ /x/i AND @a !=~ /y/ AND (@a == -1e3) AND g()
SET @a."b.c".0 = 1
WITH timeout = "5s"
EXEC "op://ARCHIVE"
"""

_FileParse = Callable[[str], list[ast.Stmt] | None]


@functools.cache
def _file_parse() -> _FileParse:
    """How a whole file is parsed: by txcl/lark_fast.py when it sets up against the installed
    lark and builds what stock lark builds from _SAMPLE, else by stock lark."""
    stock = _lark("file")

    def parse_stock(text: str) -> list[ast.Stmt] | None:
        # lark types parse() as returning a Tree, but our transformer returns the statements.
        return stock.parse(text)  # type: ignore[return-value]

    try:
        fast = lark_fast.FileParser(stock, _BUILDERS, _on_comment, MAX_NESTING)
    except lark_fast.Unavailable as err:
        _log.info("parsing with stock lark: %s", err)
        return parse_stock
    parse_fast: _FileParse = fast.parse
    expected = _sample_parse(parse_stock)
    if not isinstance(expected[0], list) or _sample_parse(parse_fast) != expected:
        _log.warning("parsing with stock lark: txcl/lark_fast.py disagrees with it on a sample")
        return parse_stock
    return parse_fast


def _sample_parse(parse: _FileParse) -> tuple[object, list[tuple[str, int, int]]]:
    scan = _LineScan("<sample>", 1)
    reset = _SCAN.set(scan)
    try:
        statements: object = parse(_SAMPLE)
    except Exception as err:  # a disagreement to report, not to raise
        statements = repr(err)
    finally:
        _SCAN.reset(reset)
    return statements, [(t.value, t.line or 0, t.column or 0) for t in scan.comments]


def _parse_file(scan: _LineScan, text: str) -> list[ast.Stmt] | None:
    """The statements of a whole file; None if it has an error."""
    reset = _SCAN.set(scan)
    try:
        return _file_parse()(text)
    except (UnexpectedInput, _Refused):
        return None
    finally:
        _SCAN.reset(reset)


def _accepts(err: UnexpectedInput) -> frozenset[str]:
    """What the parser would take in place of the bad token, after pending reductions
    (lark's `expected` is the merged LALR lookahead set, too wide to show)."""
    accepts = getattr(err, "accepts", None) or getattr(err, "expected", None) or ()
    return frozenset(accepts) - {"COMMENT"}


@functools.cache
def _example_errors() -> tuple[tuple[str, object, frozenset[str], str, str], ...]:
    """(label, state, accepts, token type, token text) of every example, parsed once."""
    found = []
    for label, examples in SYNTAX_EXAMPLES.items():
        for example in examples:
            try:
                _parse_line(_LineScan("<example>", 1), example)
            except _Refused:
                continue
            except UnexpectedInput as err:
                token = getattr(err, "token", None)
                kind, text = (token.type, str(token)) if token is not None else ("", "")
                found.append((label, err.state, _accepts(err), kind, text))
    return tuple(found)


def _label(err: UnexpectedInput) -> str | None:
    """The label of the example failing like `err`, as lark's match_examples picks it (states
    compared with ==, as it does; their type is lark's business): same state and accepted
    set; then the same token, else the same token type, else any."""
    state, accepts = err.state, _accepts(err)
    token = getattr(err, "token", None)
    by_type = by_state = None
    for label, example_state, example_accepts, kind, text in _example_errors():
        if example_state != state or example_accepts != accepts:
            continue
        if token is not None and kind == token.type:
            if text == str(token):
                return label
            by_type = by_type or label
        by_state = by_state or label
    return by_type or by_state


# --- tree -> ast -------------------------------------------------------------------------------


def _pos(token: Token | Scanned) -> Pos:
    scan = _SCAN.get()
    line = scan.lineno + (token.line or 1) - 1
    return Pos(scan.name, line, (token.column or 1) + scan.column_shift)


def _nested(node: _N, *children: object) -> _N:
    """Record how deeply `node` nests; refuse it beyond MAX_NESTING."""
    scan = _SCAN.get()
    depths = scan.depths
    depth = 1
    for child in children:
        below = depths.get(id(child), 0)
        if below >= depth:
            depth = below + 1
    if depth > MAX_NESTING:
        raise _Refused(_TOO_DEEP, node.pos.column - scan.column_shift)
    scan.depths[id(node)] = depth
    return node


# Each builder takes the children lark keeps for a rule (tokens named with a leading "_" and
# anonymous ones such as "=" are dropped) and returns an ast node. The names are the grammar's
# aliases, else its rule names. Both parsers call them directly: the line parser as the
# methods of a plain lark Transformer, the file parse from its own reduce callbacks.
Children = Sequence[Any]


def _file(children: Children) -> list[ast.Stmt]:
    return list(children)


def _line(children: Children) -> ast.Stmt | None:
    return children[0] if children else None


def _when(children: Children) -> ast.When:
    keyword, expr = children
    return ast.When(expr, _pos(keyword))


def _set(children: Children) -> ast.Set:
    keyword, target, value = children
    return ast.Set(target, value, _pos(keyword))


def _exec(children: Children) -> ast.Exec:
    keyword, uri = children
    return ast.Exec(_string(uri.value, uri.column), _pos(keyword))


def _with(children: Children) -> ast.With:
    keyword, key, value = children
    return ast.With(key.value, value, _pos(keyword))


# operators; a binary node sits where its left operand starts
def _or(children: Children) -> ast.Or:
    left, right = children
    return _nested(ast.Or(left, right, left.pos), left, right)


def _and(children: Children) -> ast.And:
    left, right = children
    return _nested(ast.And(left, right, left.pos), left, right)


def _not(children: Children) -> ast.Not:
    keyword, operand = children
    return _nested(ast.Not(operand, _pos(keyword)), operand)


def _comparison(op: str) -> Callable[[Children], ast.Compare]:
    def build(children: Children) -> ast.Compare:
        left, right = children
        return _nested(ast.Compare(op, left, right, left.pos), left, right)

    return build


def _not_member(children: Children) -> ast.Compare:
    left, _keyword, right = children
    return _nested(ast.Compare("NOT IN", left, right, left.pos), left, right)


def _match(children: Children) -> ast.Match:
    left, regex = children
    return _nested(ast.Match(left, _regex(regex), False, left.pos), left)


def _not_match(children: Children) -> ast.Match:
    left, regex = children
    return _nested(ast.Match(left, _regex(regex), True, left.pos), left)


def _add(children: Children) -> ast.Add:
    left, right = children
    return _nested(ast.Add(left, right, left.pos), left, right)


# atoms
def _at_path(children: Children) -> ast.Path:
    (token,) = children
    return ast.Path(("_txc", *_segments(token, 1)), _pos(token))


def _bare_path(children: Children) -> ast.Path:
    (token,) = children
    return ast.Path(_segments(token, 0), _pos(token))


def _jsonpath(children: Children) -> ast.JsonPath:
    (token,) = children
    return ast.JsonPath(token.value, _pos(token))


def _string_literal(children: Children) -> ast.Literal:
    (token,) = children
    return ast.Literal(_string(token.value, token.column), _pos(token))


def _number_literal(children: Children) -> ast.Literal:
    (token,) = children
    return ast.Literal(_number(token), _pos(token))


def _keyword_literal(value: bool | None) -> Callable[[Children], ast.Literal]:
    def build(children: Children) -> ast.Literal:
        return ast.Literal(value, _pos(children[0]))

    return build


def _list(children: Children) -> ast.ListLit:
    bracket, *items = children
    return _nested(ast.ListLit(tuple(items), _pos(bracket)), *items)


def _call(children: Children) -> ast.Call:
    name, *args = children
    return _nested(ast.Call(name.value.lower(), tuple(args), _pos(name)), *args)


def _bare_word(children: Children) -> ast.Expr:
    (token,) = children
    word = token.value
    raise _Refused(
        f'bare word {word} is not a value: write a string ("{word}") '
        f"or a path such as @lmtp.{word} or ticket.{word}",
        token.column or 1,
    )


_BUILDERS: Final[dict[str, Callable[[Children], Any]]] = {
    "file": _file,
    "line": _line,
    "when": _when,
    "set": _set,
    "exec": _exec,
    "with_": _with,
    "or_": _or,
    "and_": _and,
    "not_": _not,
    "eq": _comparison("=="),
    "ne": _comparison("!="),
    "lt": _comparison("<"),
    "le": _comparison("<="),
    "gt": _comparison(">"),
    "ge": _comparison(">="),
    "member": _comparison("IN"),
    "not_member": _not_member,
    "match": _match,
    "not_match": _not_match,
    "add": _add,
    "at_path": _at_path,
    "bare_path": _bare_path,
    "jsonpath": _jsonpath,
    "string": _string_literal,
    "number": _number_literal,
    "true": _keyword_literal(True),
    "false": _keyword_literal(False),
    "null": _keyword_literal(None),
    "list": _list,
    "call": _call,
    "bare_word": _bare_word,
}

# A lark Transformer whose methods are the builders as they are: lark calls a method that
# carries no v_args wrapper with the list of children, one call per reduction.
_ToAst: Final = type(
    "_ToAst", (Transformer,), {name: staticmethod(build) for name, build in _BUILDERS.items()}
)


def _regex(token: Token | Scanned) -> ast.Regex:
    text = token.value
    close = text.rindex("/")
    flags = text[close + 1 :]
    for index, flag in enumerate(flags):
        column = (token.column or 0) + close + 1 + index
        if flag not in "ims":
            raise _Refused(f"unknown regex flag {flag!r}; the flags are i, m and s", column)
        if flag in flags[:index]:
            raise _Refused(f"regex flag {flag!r} is given twice", column)
    pattern = _REGEX_ESCAPE.sub(_unescape_slash, text[1:close])
    return ast.Regex(pattern, flags, _pos(token))


def _unescape_slash(m: re.Match[str]) -> str:
    return "/" if m.group(1) == "/" else m.group(0)


def _string(text: str, column: int | None) -> str:
    """A JSON string literal as written at `column`, decoded."""
    if len(text) > 1 and text[0] == '"' == text[-1] and "\\" not in text and '"' not in text[1:-1]:
        value = text[1:-1]  # no escape: what json.loads() would return, without its cost
    else:
        value = _json_string(text, column)
    bad = _SURROGATE.search(value)
    if bad:
        raise _Refused("string holds an unpaired surrogate (not valid in UTF-8)", column or 0)
    return value


def _json_string(text: str, column: int | None) -> str:
    try:
        value = json.loads(text, strict=False)
    except json.JSONDecodeError as err:
        raise _Refused(
            'invalid escape in string; use JSON escapes such as \\n, \\" or \\u00e9',
            (column or 0) + err.pos,
        ) from None
    return value


def _number(token: Token | Scanned) -> int | float:
    text = token.value
    if "." in text or "e" in text or "E" in text:
        value = float(text)
        if not math.isfinite(value):
            raise _Refused(f"number {text[:40]} is out of range", token.column or 0)
        return value
    if len(text) > _MAX_INT_DIGITS:
        raise _Refused(f"integer longer than {_MAX_INT_DIGITS} digits", token.column or 0)
    return int(text)


def _segments(token: Token | Scanned, skip: int) -> tuple[ast.Segment, ...]:
    try:
        return _path_segments(token.value, skip)
    except _Refused as err:
        raise _Refused(err.message, (token.column or 0) + err.column) from None


@functools.lru_cache(maxsize=8192)
def _path_segments(path: str, skip: int) -> tuple[ast.Segment, ...]:
    """The segments of a path token's text; the columns of its errors count from the start
    of the text. Cached: the same paths recur across the files of a tree."""
    segments: list[ast.Segment] = []
    for m in _SEGMENT.finditer(path, skip):
        text = m.group()
        column = m.start()
        if text.startswith('"'):
            segments.append(_string(text, column))
        elif text.isdigit():
            if len(text) > _MAX_INDEX_DIGITS:
                raise _Refused(f"list index {text[:20]}... is too large", column)
            segments.append(int(text))
        else:
            segments.append(text)
    return tuple(segments)


# --- errors ----------------------------------------------------------------------------------


def _friendly(names: set[str] | frozenset[str]) -> str:
    if not names:
        return "nothing more"
    words: list[str] = []
    names = set(names)
    if len(names & _VALUE_STARTS) >= 4:
        names -= _VALUE_STARTS
        words.append("a value")
    terminals = {t.name: t for t in parser().terminals}
    shown = []
    if {"_IN", "NOT"} <= names:  # after a value, NOT can only start NOT IN
        names.discard("NOT")
        shown.append("NOT IN")
    for name in names:
        term = terminals.get(name)
        if name in _FRIENDLY:
            shown.append(_FRIENDLY[name])
        elif term is not None and isinstance(term.pattern, PatternStr):
            shown.append(f"'{term.pattern.value}'")
        else:
            shown.append(name)
    operators = [s for s in shown if s.strip("'") in _OPERATORS]
    if len(operators) >= 4:
        shown = [s for s in shown if s not in operators]
        words.append("an operator")
    words.extend(sorted(shown))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _found(token: Token) -> str:
    if token.type == "$END":
        return "end of line"
    text = str(token)
    return repr(text if len(text) <= 30 else text[:27] + "...")


def _describe(err: UnexpectedInput, text: str) -> tuple[str, int]:
    """A plain-words message and the column it points at."""
    if isinstance(err, UnexpectedCharacters):
        pos = err.pos_in_stream or 0
        char = text[pos] if pos < len(text) else ""
        if char == '"':
            return "unterminated string", err.column
        if char == "/":
            return "unterminated regex", err.column
        if char == "@":
            return "a path after '@' needs a segment, as in @lmtp.rcpt", err.column
        if char == ".":
            return "a '.' in a path must be followed by a segment", err.column
        hint = _CHARACTER_HINTS.get(char, "")
        return f"unexpected character {char!r}{hint}", err.column
    assert isinstance(err, UnexpectedToken)
    token = err.token
    column = token.column or 1
    if token.type == "$END":
        column = token.end_column or len(text.rstrip(" \t")) + 1
    accepts = _accepts(err)
    expected = _friendly(accepts)
    found = _found(token)
    keyword = _did_you_mean(token, accepts)
    if keyword:
        return f"{found} is not a keyword (did you mean {keyword}?); expected {expected}", column
    label = _label(err)
    if label is None:
        return f"unexpected {found}; expected {expected}", column
    return f"{label}; expected {expected}, found {found}", column


def _did_you_mean(token: Token, accepts: frozenset[str]) -> str:
    """For a word where a keyword would do (`WHN`, `ADN`), the closest such keyword, else ""."""
    if token.type != "NAME":
        return ""
    keywords = [_FRIENDLY[name] for name in accepts & _KEYWORDS]
    close = difflib.get_close_matches(str(token).upper(), keywords, n=1, cutoff=0.5)
    return close[0] if close else ""


# --- the public entry points ----------------------------------------------------------------


def _statement(scan: _LineScan, text: str) -> ast.Stmt | None:
    """One line -> its statement (None for a blank or comment line)."""
    try:
        return _parse_line(scan, text)
    except UnexpectedInput as err:
        raise _Refused(*_describe(err, text)) from None


def parse(source: str, name: str) -> ast.File:
    """Parse a TXCL file. Raises TxclSyntaxError carrying every problem it found."""
    lines = source_lines(source)
    scan = _LineScan(name, 1)
    statements = _parse_file(scan, "\n".join(lines))
    if statements is None:
        return _parse_by_line(lines, name)
    comments = tuple(
        ast.Comment(t.value[1:].rstrip(), Pos(name, t.line or 1, t.column or 1))
        for t in scan.comments
    )
    problems: list[Problem] = []
    rules = _group(statements, problems, lines)
    if problems:
        raise TxclSyntaxError(problems)
    return ast.File(name, rules, comments)


def _parse_by_line(lines: list[str], name: str) -> ast.File:
    """Parse each line on its own, so that every bad line is reported."""
    statements: list[ast.Stmt] = []
    comments: list[ast.Comment] = []
    problems: list[Problem] = []
    for number, text in enumerate(lines, start=1):
        if len(problems) >= MAX_PROBLEMS:
            message = f"too many syntax errors; stopped after {MAX_PROBLEMS}"
            problems.append(Problem(CODE, message, Pos(name, number, 1)))
            break
        stripped = text.lstrip(" \t")
        if not stripped:
            continue
        if stripped.startswith("#"):  # the common comment line, without the parser
            column = len(text) - len(stripped) + 1
            comments.append(ast.Comment(stripped[1:].rstrip(), Pos(name, number, column)))
            continue
        scan = _LineScan(name, number)
        try:
            statement = _statement(scan, text)
        except _Refused as err:
            pos = Pos(name, number, err.column)
            problems.append(
                Problem(CODE, err.message, pos, context=caret_context(text, err.column))
            )
            continue
        comments.extend(
            ast.Comment(t.value[1:].rstrip(), Pos(name, number, t.column or 1))
            for t in scan.comments
        )
        if statement is not None:
            statements.append(statement)

    rules = _group(statements, problems, lines)
    if problems:
        raise TxclSyntaxError(problems)
    return ast.File(name, rules, tuple(comments))


def _group(
    statements: list[ast.Stmt], problems: list[Problem], lines: list[str]
) -> tuple[ast.Rule, ...]:
    """WHENs then a body make a rule; a WHEN after a body line starts the next one."""
    rules: list[ast.Rule] = []
    whens: list[ast.When] = []
    body: list[ast.BodyStmt] = []

    def close() -> None:
        if whens and not body:
            pos = whens[0].pos
            message = "a rule needs at least one SET, EXEC or WITH after its WHENs"
            context = caret_context(lines[pos.line - 1], pos.column)
            problems.append(Problem(CODE, message, pos, context=context))
        elif whens or body:
            rules.append(ast.Rule(tuple(whens), tuple(body), (whens or body)[0].pos))
        whens.clear()
        body.clear()

    for statement in statements:
        if isinstance(statement, ast.When):
            if body:
                close()
            whens.append(statement)
        else:
            body.append(statement)
    close()
    return tuple(rules)


def parse_expression(source: str, name: str = "<expr>") -> ast.Expr:
    """Parse one expression, as it would stand after WHEN (for tests and tools)."""
    prefix = "WHEN "
    text = source.replace("\r\n", "\n")
    if "\n" in text:
        raise TxclSyntaxError(Problem(CODE, "an expression fits on one line", Pos(name, 1, 1)))
    try:
        statement = _statement(_LineScan(name, 1, -len(prefix)), prefix + text)
    except _Refused as err:
        column = max(1, err.column - len(prefix))
        context = caret_context(text, column)
        raise TxclSyntaxError(
            Problem(CODE, err.message, Pos(name, 1, column), context=context)
        ) from None
    assert isinstance(statement, ast.When)
    return statement.expr
