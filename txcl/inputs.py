"""Reading what a person or another process hands the CLIs, bounded: a clear error naming the
file, never a hang and never a traceback.

- read_bytes / read_text: a regular file only (a FIFO, a device or a folder is refused before
  it is read, so `/dev/zero` or a pipe cannot hang a command), at most `limit` bytes.
- parse_json / load_json / load_yaml: documents nested at most MAX_DEPTH levels with at most
  MAX_NODES values (YAML aliases count once per use: that is how JSON output expands them).
- check_tree: the same bound for data built elsewhere (a cyclic or enormous envelope).
- terminal_text: data made safe to print to a terminal (control characters as escapes).

Every refusal is an InputError whose text is one line: `<file>: <what is wrong>`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from typing import IO, Any, Final, TextIO

import yaml

from txcl.errors import Pos, Problem

# Envelopes, messages, test cases and state files: a message is at most 25 MiB by default
# (--lmtp-max-msg-bytes), and its envelope holds it again, base64-encoded attachments included.
MAX_INPUT_BYTES: Final = 64 << 20
# Envelopes nest a few levels (_txc.lmtp.msg.headers...); far deeper is a hostile document
# that would exhaust the recursion of whatever walks it next.
MAX_DEPTH: Final = 100
# Values of a document once YAML aliases (or shared objects) are expanded, as JSON output or
# a copy would: a real envelope holds thousands, a "billion laughs" document billions.
MAX_NODES: Final = 2_000_000
STDIN: Final = "-"


class InputError(ValueError):
    """An input that cannot be used. `str()` is one line: `<where>[:line:column]: <message>`.
    A ValueError, so a caller that already treats unreadable data as ValueError keeps doing so."""

    def __init__(self, where: str | os.PathLike[str], message: str, line: int = 0, column: int = 0):
        self.where = os.fspath(where)
        self.message = message
        self.line = line
        self.column = column
        at = f"{self.where}:{line}:{column}" if line else self.where
        super().__init__(terminal_text(f"{at}: {message}", keep=""))

    def problem(self, code: str) -> Problem:
        """The same, as the Problem a txcl command reports."""
        if self.line:
            return Problem(code, self.message, Pos(self.where, self.line, self.column))
        return Problem(code, f"{self.where}: {self.message}")


class TooLarge(InputError):
    """A file over its limit; `size` is what is known of it (at least limit + 1)."""

    def __init__(self, where: str | os.PathLike[str], size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(where, f"{describe_size(size)}; the limit is {describe_size(limit)}")


def describe_size(size: int) -> str:
    """`1,048,577 bytes` below 2 MiB, `10.0 MiB` from there."""
    return f"{size / (1 << 20):.1f} MiB" if size >= 2 << 20 else f"{size:,} bytes"


# --- files -----------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _reason(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "cannot be read: a symlink loop"
    return f"cannot be read: {err.strerror or err}"


def require_regular(path: str | os.PathLike[str]) -> None:
    """InputError unless `path` is a regular file (after symlinks), saying what it is instead."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise InputError(path, _reason(err)) from None
    if not stat.S_ISREG(mode):
        raise InputError(path, f"not a regular file: {_kind(mode)}")


def symlink_problem(path: str, root: str | os.PathLike[str], real_root: str) -> str | None:
    """Why a walk of the tree at `root` (real path `real_root`) must not follow the symlink
    `path`: it loops, or it leads out of the tree. None when it may be followed."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        return f"a symlink that leads out of {os.fspath(root)}"
    return None


def read_bytes(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    The file is checked before it is opened and again once open (it may have been replaced),
    and opened without blocking, so a FIFO that appears in between cannot hang the read."""
    require_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise InputError(path, _reason(err)) from None
    with open(fd, "rb") as handle:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputError(path, f"not a regular file: {_kind(info.st_mode)}")
            if info.st_size > limit:
                raise TooLarge(path, info.st_size, limit)
            # size + 1 first: reading `limit` would allocate that much for every small file;
            # the file may also have grown since the stat, up to the limit and past it
            data = handle.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += handle.read(limit + 1 - len(data))
        except OSError as err:
            raise InputError(path, _reason(err)) from None
    if len(data) > limit:
        raise TooLarge(path, len(data), limit)
    return data


def _read_stdin(limit: int) -> bytes:
    # A text stream without bytes underneath (a test's StringIO) is read as text.
    binary: IO[bytes] | None = getattr(sys.stdin, "buffer", None)
    try:
        data = binary.read(limit + 1) if binary else sys.stdin.read(limit + 1).encode()
    except OSError as err:
        raise InputError(STDIN, _reason(err)) from None
    if len(data) > limit:
        raise TooLarge(STDIN, len(data), limit)
    return data


def _decode_utf8(data: bytes, where: str | os.PathLike[str]) -> str:
    """UTF-8 text without a leading byte order mark; InputError at the first bad byte, its
    line and column (in characters) given."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[line_start:err.start].decode("utf-8", "replace")) + 1
        raise InputError(where, f"not UTF-8 text: byte 0x{data[err.start]:02x}", line,
                         column) from None


def read_text(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> str:
    """read_bytes(), decoded as UTF-8; `-` is standard input."""
    data = _read_stdin(limit) if os.fspath(path) == STDIN else read_bytes(path, limit)
    return _decode_utf8(data, path)


# --- documents -------------------------------------------------------------------------------


def check_tree(value: Any, where: str | os.PathLike[str] = "<data>") -> None:
    """InputError unless `value` nests at most MAX_DEPTH levels with at most MAX_NODES values.

    Iterative, so it cannot itself run out of stack; a cycle shows as nesting without end."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise InputError(where, f"too large: more than {MAX_NODES:,} values")
        if depth > MAX_DEPTH:
            raise InputError(where, f"nested more than {MAX_DEPTH} levels deep (or cyclic)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def parse_json(text: str | bytes, where: str | os.PathLike[str]) -> Any:
    """A JSON document, bounded as check_tree() says."""
    return _parsed(lambda: json.loads(text), where)


def _parsed(parse: Callable[[], Any], where: str | os.PathLike[str]) -> Any:
    """What `parse` returns, bounded as check_tree() says; its errors as one InputError."""
    try:
        value = parse()
    except RecursionError:
        raise InputError(where, f"nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, yaml.YAMLError) as err:  # JSON's errors are ValueErrors
        raise _syntax_error(where, err) from None
    check_tree(value, where)
    return value


def _syntax_error(where: str | os.PathLike[str], err: Exception) -> InputError:
    if isinstance(err, json.JSONDecodeError):
        return InputError(where, f"not valid JSON: {err.msg}", err.lineno, err.colno)
    if isinstance(err, UnicodeDecodeError):
        return InputError(where, f"not UTF-8 text: {err.reason}")
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        return InputError(where, f"not valid YAML: {err.problem}", mark.line + 1, mark.column + 1)
    return InputError(where, f"not valid YAML: {err}")


def load_json(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> Any:
    """A JSON file (`-`: standard input): a regular file, bounded in bytes and nesting."""
    data = _read_stdin(limit) if os.fspath(path) == STDIN else read_bytes(path, limit)
    return parse_json(data, path)


def load_json_object(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> dict[str, Any]:
    """load_json(), and the document must be an object."""
    value = load_json(path, limit)
    if not isinstance(value, dict):
        raise InputError(path, f"not a JSON object but {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, where: str | os.PathLike[str]) -> Any:
    """A YAML document (safe types only), bounded as check_tree() says."""
    return _parsed(lambda: yaml.load(text, Loader=_yaml_loader()), where)


def load_yaml(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> Any:
    """A YAML file: a regular file, UTF-8, bounded in bytes and nesting."""
    return parse_yaml(read_text(path, limit), path)


# --- terminals -------------------------------------------------------------------------------

# C0 and C1 controls, DEL, and the invisible characters that reorder or split what a terminal
# shows (bidirectional overrides and isolates, line and paragraph separators).
_BEYOND_C0: Final = "\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[\x00-\x1f{_BEYOND_C0}]")
_UNSAFE_IN_JSON: Final = re.compile(f"[{_BEYOND_C0}]")  # json.dumps escapes C0 itself
_NAMED: Final = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\x1b": "\\e"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def terminal_text(text: str, keep: str = "\n") -> str:
    """`text` with control characters (except those in `keep`) shown as visible escapes:
    `\\r`, `\\e`, `\\x00`, `\\u202e`. A backslash itself is left as it is."""
    if keep:
        return keep[0].join(terminal_text(part, keep[1:]) for part in text.split(keep[0]))
    return _UNSAFE.sub(_escape, text)


def terminal_json(value: Any) -> str:
    """`value` as indented JSON, non-ASCII text kept, and what terminal_text() escapes written
    as `\\u` escapes (json.dumps escapes only C0 itself): the same document, safe to print."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def write_terminal(out: TextIO, render: Callable[[TextIO], None]) -> None:
    """Run `render` into a buffer, then write its text to `out` with terminal_text()."""
    buffer = io.StringIO()
    render(buffer)
    out.write(terminal_text(buffer.getvalue()))

