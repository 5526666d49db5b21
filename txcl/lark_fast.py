"""The whole-file fast path of the TXCL parser: lark's LALR table driven without lark's lexer
and tree builder.

This is the one module that reaches inside lark. It reads a stock `Lark(..., parser="lalr")`
instance that parser.py builds anyway and takes from it:

- the terminals, ordered as lark's basic lexer tries them, to tokenize a file with one regex
  match per token into small NamedTuples instead of lark Tokens;
- the LALR table (`lark.parsers.lalr_analysis`) of its parser state
  (`lark.parsers.lalr_parser_state.ParserState`), laid out again with each reduction's length,
  origin and callback, and driven by lark's own LALR loop rewritten over that layout (one
  dict lookup per action), with a reduce callback per rule that calls parser.py's builders
  directly. A run of reductions that only pass a value up (`?expr: or_expr`, ...) is looked
  up as one step: only the state changes, and where it ends depends on the state below.

Anything surprising at setup (an import that fails, a lark outside VERIFIED_LARK, a table of
another shape, a rule without a builder) raises Unavailable, and parser.py parses with the
stock lark instance instead. parser.py also checks that both agree on a sample file before
it uses this module.
"""

from __future__ import annotations

import importlib.metadata
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from lark import Lark, Token
from lark.exceptions import UnexpectedToken

__all__ = ["VERIFIED_LARK", "FileParser", "Scanned", "Unavailable"]

# The lark releases this module was checked against, [lowest, first unverified): the same range
# as the lark dependency in pyproject.toml.
VERIFIED_LARK: Final[tuple[tuple[int, int], tuple[int, int]]] = ((1, 3), (1, 4))

Builder = Callable[[Sequence[Any]], Any]


class Unavailable(Exception):
    """The fast path cannot be set up against the installed lark; use stock lark."""


class Scanned(NamedTuple):
    """A token of the fast scan: what lark's LALR loop (type) and the builders (value, line,
    column) read of a lark Token, without the cost of lark's Token constructor."""

    type: str
    value: str
    line: int
    column: int


_END: Final = Token("$END", "")


def _lark_version() -> tuple[int, int]:
    try:
        major, minor = importlib.metadata.version("lark").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError) as err:
        raise Unavailable(f"cannot tell which lark is installed: {err}") from None


_PASS_ONE: Final = operator.itemgetter(0)
_SHIFT: Final = "shift"
_REDUCE: Final = "reduce"
_PASS: Final = "pass"
# A table entry: (_SHIFT, next state), (_REDUCE, values popped, builder, rule's origin), or
# (_PASS, {state below: (state, entry or None)}) for a run of reductions of one symbol that
# pass their value up as it is: the state they end in, under the state below the current
# one, and the entry that state has for the same token (None: a syntax error there).
_Action = tuple[Any, ...]


def _folded(table: dict[Any, dict[str, _Action]]) -> dict[Any, dict[str, _Action]]:
    """The table with each pass-up reduction (`(_REDUCE, 1, None, origin)`) replaced by the
    _PASS entry of the run of them it starts, for every state that can lie below it (one
    with a goto on the origin). The run ends in a state whose entry for the token is not a
    pass-up reduction; runs cannot loop (each reduction moves up the grammar)."""

    def run(below: Any, state: Any, kind: str) -> tuple[Any, _Action | None] | None:
        """Where the run from `state` ends over `below`; None if `below` has no goto on the
        way (it is never below `state` in a parse)."""
        action: _Action | None = table[state].get(kind)
        while action is not None and action[0] is _REDUCE and action[2] is None:
            goto = table[below].get(action[3])
            if goto is None:
                return None
            state = goto[1]
            action = table[state].get(kind)
        return state, action

    def folded(state: Any, kind: str, origin: str) -> _Action:
        ends = {below: run(below, state, kind) for below in below_of.get(origin, ())}
        return (_PASS, {below: end for below, end in ends.items() if end is not None})

    below_of: dict[str, list[Any]] = {}  # a rule's origin -> the states with a goto on it
    for state, row in table.items():
        for symbol, action in row.items():
            if action[0] is _SHIFT and not symbol.isupper():
                below_of.setdefault(symbol, []).append(state)
    return {
        state: {
            kind: folded(state, kind, action[3])
            if action[0] is _REDUCE and action[2] is None else action
            for kind, action in row.items()
        }
        for state, row in table.items()
    }


def _laid_out(
    states: Mapping[Any, Mapping[str, tuple[Any, Any]]],
    builders: Mapping[str, Builder],
    shift: Any,
    reduce: Any,
) -> dict[Any, dict[str, _Action]]:
    """lark's table with each reduction's length, builder and origin looked up once (then
    `_folded` folds each run of pass-up reductions into one entry)."""
    built: dict[int, _Action] = {}

    def reduction(rule: Any) -> _Action:
        found = built.get(id(rule))
        if found is None:
            callback: Callable[[list[Any]], Any] | None = _reduce_callback(rule, builders)
            size = len(rule.expansion)
            if size == 1 and callback is _PASS_ONE:
                callback = None
            found = built[id(rule)] = (_REDUCE, size, callback, str(rule.origin.name))
        return found

    out: dict[Any, dict[str, _Action]] = {}
    for state, actions in states.items():
        row: dict[str, _Action] = {}
        for kind, (action, arg) in actions.items():
            if action is shift:
                row[str(kind)] = (_SHIFT, arg)
            elif action is reduce:
                row[str(kind)] = reduction(arg)
            else:
                raise TypeError(f"an action {action!r}")
        out[state] = row
    return out


def _inlined(symbol: Any) -> bool:
    """A helper rule lark made up (`("," expr)*`): its children belong to its parent."""
    return not symbol.is_term and str(symbol.name).startswith("_")


def _reduce_callback(rule: Any, builders: Mapping[str, Builder]) -> Callable[[list[Any]], Any]:
    """What a reduction of `rule` pushes, given the values it pops: what lark's tree builder
    with the builders as a Transformer would push, without its layers of wrappers."""
    kept = [
        i for i, symbol in enumerate(rule.expansion) if not (symbol.is_term and symbol.filter_out)
    ]
    spliced = frozenset(i for i in kept if _inlined(rule.expansion[i]))
    name = str(rule.alias or rule.origin.name)
    build = builders.get(name)
    if build is None and rule.options.expand1 and len(kept) == 1 and not spliced:
        return _PASS_ONE if kept[0] == 0 else operator.itemgetter(kept[0])  # `?rule`: its child
    if build is None and not name.startswith("_"):
        raise Unavailable(f"grammar rule {name} has no builder")
    if spliced:

        def gather(values: list[Any]) -> list[Any]:
            children: list[Any] = []
            for i in kept:
                if i in spliced:
                    children.extend(values[i])
                else:
                    children.append(values[i])
            return children

        return gather if build is None else lambda values: build(gather(values))
    if build is None:
        return lambda values: [values[i] for i in kept]
    if len(kept) == len(rule.expansion):
        return build
    if len(kept) > 1:
        pick = operator.itemgetter(*kept)  # a tuple of the kept values
        return lambda values: build(pick(values))
    return lambda values: build([values[i] for i in kept])


class FileParser:
    """Parses with `grammar`'s table and `builders`, the way the stock instance would.

    grammar:     a `Lark(..., parser="lalr", lexer="basic")` with one start symbol
    builders:    the transformer's callbacks by rule name (alias, else rule name)
    on_comment:  called with each COMMENT token, as the stock lexer callback is
    max_nesting: brackets nested deeper than this make parse() give up (return None)
    """

    def __init__(
        self,
        grammar: Lark,
        builders: Mapping[str, Builder],
        on_comment: Callable[[Scanned], object],
        max_nesting: int,
    ) -> None:
        low, high = VERIFIED_LARK
        if not low <= _lark_version() < high:
            raise Unavailable(f"lark {_lark_version()} is outside {low}..{high}")
        try:
            from lark.parsers.lalr_analysis import Reduce, Shift
            from lark.parsers.lalr_parser_state import ParserState
        except ImportError as err:
            raise Unavailable(f"lark's LALR internals moved: {err}") from None
        try:
            (start,) = grammar.options.start
            self._pattern = _token_pattern(grammar)
            state = grammar.parse_interactive("").parser_state
            if not isinstance(state, ParserState):
                raise TypeError(f"a parser state of type {type(state).__name__}")
            table = state.parse_conf.parse_table
            self._start = table.start_states[start]
            self._end = table.end_states[start]
            self._actions = _folded(_laid_out(table.states, builders, Shift, Reduce))
        except (AttributeError, TypeError, ValueError, KeyError) as err:
            raise Unavailable(f"lark's table is not what this module expects: {err!r}") from None
        terminals = {kind for actions in self._actions.values() for kind in actions if kind.isupper()}
        unknown = set(self._pattern.groupindex) - terminals - set(grammar.ignore_tokens)
        if unknown:
            raise Unavailable(f"terminals the table never takes: {sorted(unknown)}")
        self._on_comment = on_comment
        self._max_nesting = max_nesting

    def parse(self, text: str) -> Any:
        """The builders' result for `text`; None where lark's lexer would stop (a character no
        terminal takes, brackets nested too deeply). A syntax error raises lark's
        UnexpectedToken, and whatever a builder raises passes through."""
        scanned = self._tokenize(text)
        if scanned is None:
            return None
        tokens: list[Any] = [*scanned, _END]
        # lark's LALR loop (ParserState.feed_token), over the table as _laid_out/_folded lay it out
        actions, end = self._actions, self._end
        state = self._start  # always states[-1]
        states: list[Any] = [state]
        values: list[Any] = []
        push_state, push_value = states.append, values.append
        for token in tokens:
            kind = token.type
            action = actions[state].get(kind)
            while True:
                if action is None:
                    expected = {k for k in actions[state] if k.isupper()}
                    raise UnexpectedToken(token, expected)
                tag = action[0]
                if tag is _SHIFT:
                    state = action[1]
                    push_state(state)
                    push_value(token)
                    break
                if tag is _PASS:  # `?rule`s passing their one value up: only the state changes
                    state, action = action[1][states[-2]]
                    states[-1] = state
                    continue
                _, size, build, origin = action
                if size:
                    popped = values[-size:]
                    del states[-size:]
                    del values[-size:]
                else:
                    popped = []
                state = actions[states[-1]][origin][1]
                push_state(state)
                push_value(build(popped))
                if token is _END and state == end:
                    return values[-1]
                action = actions[state].get(kind)
        raise UnexpectedToken(_END, set())  # cannot happen: $END reduces to the end state

    def _tokenize(self, text: str) -> list[Scanned] | None:
        match = self._pattern.match
        scanned = tuple.__new__  # Scanned's fields, without NamedTuple's Python-level __new__
        tokens: list[Scanned] = []
        pos, end, line, line_start, depth = 0, len(text), 1, 0, 0
        while pos < end:
            found = match(text, pos)
            if found is None:
                return None  # cannot happen: the pattern also matches nothing
            stop = found.end()
            kind = found.lastgroup
            if kind is None:
                if stop == pos:
                    return None  # a character no terminal takes
                pos = stop  # blanks at the end of the text
                continue
            start = found.end(1)  # behind the blanks
            value = text[start:stop]
            column = start - line_start + 1
            if kind == "_NL":
                tokens.append(scanned(Scanned, (kind, value, line, column)))
                line += 1
                line_start = stop
            elif kind == "COMMENT":
                self._on_comment(scanned(Scanned, (kind, value, line, column)))
            else:
                if kind in _OPENERS:
                    depth += 1
                    if depth > self._max_nesting:
                        return None
                elif kind in _CLOSERS:
                    depth -= 1
                tokens.append(scanned(Scanned, (kind, value, line, column)))
            pos = stop
        return tokens


_OPENERS: Final = frozenset({"_LPAR", "LSQB"})
_CLOSERS: Final = frozenset({"_RPAR", "_RSQB"})


def _token_pattern(grammar: Lark) -> re.Pattern[str]:
    """The grammar's terminals as one regex, in the order lark's basic lexer tries them
    (priority, then longest possible match, then longest pattern, then name), behind the
    blanks lark ignores (group 1): one match per token. An ignored terminal other than the
    blanks (a comment) keeps its group; with no terminal after the blanks the match is blanks
    only. Each terminal's group is an empty one closing its alternative (lastgroup names
    it): a group in front would hide the alternative's first character or set from the
    regex engine, which skips an alternative that cannot start there without entering it."""
    terminals = sorted(
        grammar.terminals,
        key=lambda t: (-t.priority, -t.pattern.max_width, -len(t.pattern.value), t.name),
    )
    blanks = "|".join(
        t.pattern.to_regexp()
        for t in terminals
        if t.name in grammar.ignore_tokens and t.name != "COMMENT"
    )
    alternatives = "|".join(f"(?:{t.pattern.to_regexp()})(?P<{t.name}>)" for t in terminals)
    return re.compile(f"((?:{blanks})*+)(?:{alternatives})?")
