"""Parsed and checked rule files kept on disk, so an unchanged file is not parsed again.

Like CPython's `.pyc` files: one entry per rule file, keyed by a hash of the file's path and
text, holding its syntax tree (None if it does not parse) and its parse and compile problems;
`txcl lint` adds its findings, with the ops it checked them against, and keeps the findings
of each whole stack under a key of its files (stack_key). Entries live in 256
shard files by the first byte of their key: creating a file costs far more than reading
one on a busy disk, and a reload that recompiles one stack reads a few shards, not all.

Each shard starts with the engine key (a hash of the Python version, the grammar and the
source of the txcl modules) and a digest of its payload: a shard of
another engine, a torn or corrupt one is ignored with a log line and replaced, never
trusted. Compiling a cached syntax tree again (regexes, getters) is the loader's job; it is
deterministic, so what compiled before compiles again.

Where: `txco serve` uses `<state-dir>/cache/`; `txcl lint` and `txcl test` use
`$XDG_CACHE_HOME/txcl` (else `~/.cache/txcl`). The folder is created 0700 and shards are
written 0600 through a temporary file and a rename; a folder another user could write to
(the entries are pickles) or that cannot be written is not used, with one log line. The
cache only grows (an edited file adds an entry); removing the folder is always safe.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import functools
import hashlib
import io
import logging
import operator
import os
import pickle
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from txcl import ast
from txcl.errors import Problem

if TYPE_CHECKING:
    from txcl.loader import StackSignature

log = logging.getLogger("txcl.cache")

_Entry = TypeVar("_Entry", "CachedFile", "CachedFindings")

MAGIC: Final = b"TXCLC1\n"
SHARD_SUFFIX: Final = ".shard"
INDEX_SUFFIX: Final = ".index"
_DIGEST_BYTES: Final = 16
_KEY_BYTES: Final = 32
_ENGINE_PACKAGE: Final = "txcl"


class CachedFile:
    """What checking one rule file found: its parse and compile problems (none: it compiles),
    its syntax tree (None: it does not parse) and, once `txcl lint` looked at it, the lint
    findings with what they depend on (`findings`: (salt, findings)). A tree and findings
    read from the cache are decoded on first use: a file whose stack is unchanged needs
    neither. An entry `txcl lint` wrote keeps no tree (without_tree): lint needs only the
    findings, so the tree of such an entry is parsed again from the file's text if asked for
    (the entry says it parses; the engine is the same), and the entry is then put back into
    the cache it came from with its tree."""

    __slots__ = ("problems", "_findings", "_file", "_encoded", "_source")

    def __init__(
        self,
        file: ast.File | None,
        problems: tuple[Problem, ...],
        encoded: bytes | None = None,
        findings: tuple[str, object] | None = None,
    ) -> None:
        self.problems = problems
        self._findings: tuple[str, object] | None = findings
        self._file = file
        self._encoded = encoded  # the pickled tree; _NO_TREE: not kept
        # where a tree not kept is parsed from and then kept: (cache, path, text)
        self._source: tuple[CompileCache, str, str] | None = None

    def with_findings(self, salt: str, findings: object) -> CachedFile:
        return CachedFile(self._file, self.problems, self._encoded, (salt, findings))

    def without_tree(self) -> CachedFile:
        """This entry as `txcl lint` keeps it: without its syntax tree, if it has one."""
        if self._file is None and not self._encoded:
            return self
        return CachedFile(None, self.problems, _NO_TREE, self._findings)

    @property
    def tree_kept(self) -> bool:
        """False for an entry without_tree() whose tree is not parsed again yet."""
        return self._encoded != _NO_TREE

    @property
    def file(self) -> ast.File | None:
        if self._file is None and self._encoded:
            self._file = pickle.loads(self._encoded)
            self._encoded = None
        elif self._encoded == _NO_TREE and self._source is not None:
            from txcl.parser import parse

            cache, path, text = self._source
            self._file = parse(text, path)
            self._encoded = self._source = None
            cache.put(path, text, self)  # the tree, with the findings: not parsed again
        return self._file

    @property
    def findings(self) -> tuple[str, object] | None:
        found = self._findings
        if found is not None and isinstance(found[1], _Encoded):
            found = self._findings = (found[0], pickle.loads(found[1].data))
        return found

    def __reduce__(self) -> tuple[Any, ...]:
        encoded = self._encoded if self._file is None else _dumps(self._file)
        findings = self._findings
        if findings is not None and not isinstance(findings[1], _Encoded):
            findings = (findings[0], _Encoded(_dumps(findings[1])))
        return CachedFile, (None, self.problems, encoded, findings)


_NO_TREE: Final = b""


class _Encoded:
    """Pickled bytes inside an entry, unpickled only when asked for."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _Encoded, (self.data,)


class CachedFindings:
    """The lint findings of a whole stack (`txcl lint`): kept under a key of its files'
    paths and texts and of what the findings depend on (stack_key), so a stack whose files
    are unchanged is not looked at again, its cross-file checks included."""

    __slots__ = ("findings",)

    def __init__(self, findings: tuple[Problem, ...]) -> None:
        self.findings = findings

    def __reduce__(self) -> tuple[Any, ...]:
        return CachedFindings, (self.findings,)


def stack_key(files: Iterable[tuple[str, str]], salt: str) -> bytes:
    """The key of a stack's findings: its files' (path, text) in order, and `salt` (what
    else the findings depend on: the ops known, the schemas)."""
    digest = hashlib.sha256(b"stack\0" + salt.encode("utf-8", "surrogatepass") + b"\0")
    for path, text in files:
        digest.update(_key(path, text))
    return digest.digest()


@functools.cache
def engine_key() -> bytes:
    """A digest of everything that shapes a cached entry: the Python version, the grammar and
    the source of every module of the txcl package (not its subpackages: the chassis), so
    any change to the engine, even one not released, makes the cache stale."""
    from txcl.parser import grammar_text

    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:2]}|pickle {pickle.HIGHEST_PROTOCOL}".encode())
    digest.update(grammar_text().encode("utf-8"))
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.digest()


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/txcl`, else `~/.cache/txcl`: where `txcl lint` and `txcl test` cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "txcl"


class CompileCache:
    """Entries under one folder, in SHARDS files by the first byte of their key, each read
    when first needed; put() keeps an entry and flush() writes the shards that got one.
    Never raises for a bad folder, shard or entry: it logs and misses.

    `hits`, `misses` and `written` count this object's lookups of files and new file
    entries; `stack_hits` and `stack_misses` its lookups of stacks' findings."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._root = str(self.folder)
        self.hits = 0
        self.misses = 0
        self.written = 0
        self.stack_hits = 0
        self.stack_misses = 0
        self._said: set[str] = set()
        self._readable = self._writable = self._prepare()
        self._shards: dict[int, dict[bytes, bytes]] = {}  # first key byte -> key -> entry
        self._dirty: set[int] = set()
        self._deferred: list[str] | None = None
        self._indexes: list[StatIndex] = []

    def _prepare(self) -> bool:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.folder)
        except OSError as err:
            log.warning("compile cache %s not used: %s", self.folder, err.strerror or err)
            return False
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("compile cache %s not used: others could write to it (owner uid %d, "
                        "mode %o)", self.folder, st.st_uid, stat.S_IMODE(st.st_mode))
            return False
        return True

    def _say(self, kind: str, message: str, *args: object) -> None:
        """One warning per kind of trouble per cache (a stale cache would say it 10,000 times)."""
        if kind in self._said:
            log.debug(message, *args)
            return
        self._said.add(kind)
        log.warning(message + " (ignored; further ones are logged at debug level)", *args)

    def get(self, path: str, text: str) -> CachedFile | None:
        """The entry for this file's path and text, if there is a sound one of this engine."""
        key = _key(path, text)
        encoded = self._shard(key[0]).get(key)
        found = None if encoded is None else self._decode(encoded, key, CachedFile)
        if found is not None and not found.tree_kept:
            found._source = (self, path, text)
        if found is None:
            self.misses += 1
            if self._deferred is not None:
                self._deferred.append(path)
                return CachedFile(None, ())
        else:
            self.hits += 1
        return found

    @contextlib.contextmanager
    def deferring(self) -> Iterator[list[str]]:
        """Within it, get() answers a miss with an empty entry (no tree, no problems) and
        adds the path to the list it yields: a walk that only gathers files (the loader's
        check_only load, for `txcl lint`) leaves the parsing of those to its caller."""
        deferred: list[str] = []
        self._deferred = deferred
        try:
            yield deferred
        finally:
            self._deferred = None

    def put_encoded(self, path: str, text: str, encoded: bytes) -> None:
        """Keep an entry already encoded (encode_entry); flush() writes it."""
        key = _key(path, text)
        self._shard(key[0])[key] = encoded
        self._dirty.add(key[0])
        self.written += 1

    def put(self, path: str, text: str, entry: CachedFile) -> None:
        """Keep the entry; flush() writes it."""
        key = _key(path, text)
        self._shard(key[0])[key] = _dumps(entry)
        self._dirty.add(key[0])
        self.written += 1

    def get_findings(self, key: bytes) -> tuple[Problem, ...] | None:
        """A stack's findings kept under `key` (stack_key), if there is a sound entry."""
        encoded = self._shard(key[0]).get(key)
        found = None if encoded is None else self._decode(encoded, key, CachedFindings)
        if found is None:
            self.stack_misses += 1
            return None
        self.stack_hits += 1
        return found.findings

    def put_findings(self, key: bytes, findings: tuple[Problem, ...]) -> None:
        """Keep a stack's findings under `key`; flush() writes them."""
        self._shard(key[0])[key] = _dumps(CachedFindings(findings))
        self._dirty.add(key[0])

    def flush(self) -> None:
        """Write every shard that got entries (a temporary file, then a rename; 0600). A
        failure is logged once and turns writing off for this cache."""
        dirty, self._dirty = sorted(self._dirty), set()
        for number in dirty:
            self._write_shard(number)
        for index in self._indexes:
            index.flush()

    def stat_index(self, scope: str, salt: str) -> StatIndex:
        """The stat index of `scope` (one file of this cache; a tree's lint, say), its
        entries valid for `salt` only; flush() writes it."""
        index = StatIndex(self, scope, salt)
        self._indexes.append(index)
        return index

    # -- shards ---------------------------------------------------------------------------

    def _shard_path(self, number: int) -> str:
        return os.path.join(self._root, f"{number:02x}{SHARD_SUFFIX}")

    def _shard(self, number: int) -> dict[bytes, bytes]:
        shard = self._shards.get(number)
        if shard is None:
            shard = self._shards[number] = self._read_shard(number) if self._readable else {}
        return shard

    def _read_shard(self, number: int) -> dict[bytes, bytes]:
        shard = self._read_sealed(self._shard_path(number))
        return {} if shard is None else shard

    def _read_sealed(self, where: str) -> dict[Any, Any] | None:
        """The dict a shard or an index file holds: None if there is none, or it is not
        sound (of another engine, torn, corrupt; logged)."""
        try:
            with open(where, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            self._say("unreadable", "compile cache %s cannot be read: %s", where, err)
            return None
        head = len(MAGIC) + _KEY_BYTES + _DIGEST_BYTES
        if len(data) < head or not data.startswith(MAGIC):
            self._say("corrupt", "compile cache %s is corrupt (no header)", where)
            return None
        digest, payload = data[head - _DIGEST_BYTES:head], data[head:]
        if data[len(MAGIC):len(MAGIC) + _KEY_BYTES] != engine_key():
            self._say("stale", "compile cache %s is of another engine version", where)
            return None
        if hashlib.blake2b(payload, digest_size=_DIGEST_BYTES).digest() != digest:
            self._say("corrupt", "compile cache %s is corrupt (digest mismatch)", where)
            return None
        try:
            found = pickle.loads(payload)
        except Exception as err:  # a sound digest over a bad pickle: a bug, still not trusted
            self._say("corrupt", "compile cache %s cannot be loaded: %s", where, err)
            return None
        if not isinstance(found, dict):
            self._say("corrupt", "compile cache %s holds a %s", where, type(found).__name__)
            return None
        return found

    def _decode(self, encoded: bytes, key: bytes, kind: type[_Entry]) -> _Entry | None:
        try:
            found = pickle.loads(encoded)
        except Exception as err:
            self._say("corrupt", "compile cache entry %s cannot be loaded: %s", key.hex(), err)
            return None
        if not isinstance(found, kind):
            self._say("corrupt", "compile cache entry %s holds a %s", key.hex(),
                      type(found).__name__)
            return None
        return found

    def _write_shard(self, number: int) -> None:
        self._write_sealed(self._shard_path(number), self._shards[number])

    def _write_sealed(self, where: str, content: dict[Any, Any]) -> None:
        """Write a shard or an index file: header, digest, payload; a temporary file, then a
        rename. A failure is logged once and turns writing off for this cache."""
        if not self._writable:
            return
        payload = pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL)
        digest = hashlib.blake2b(payload, digest_size=_DIGEST_BYTES).digest()
        temporary = f"{where}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"".join((MAGIC, engine_key(), digest, payload)))
            finally:
                os.close(fd)
            os.replace(temporary, where)
        except OSError as err:
            self._writable = False
            self._say("unwritable", "compile cache %s cannot be written: %s; not writing to it "
                      "any more", self.folder, err.strerror or err)
            with contextlib.suppress(OSError):
                os.unlink(temporary)


class StatIndex:
    """A front for the cache keyed by what stat() says of a folder, as git's index is for
    its objects: what was found of a folder (a stack's lint findings) is taken again,
    without reading its files, while the folder's signature (the loader's stack_signature:
    name, inode, size, mtime and ctime of each entry) is the same. A flush keeps the entries
    asked for or put since the file was read, so a folder gone from the tree leaves it.

    Never trusted wrongly: an entry is kept only if every mtime of its signature is older
    than the moment the signature was taken by RACY_MARGIN_NS (git's racy-clean rule: a
    file written in the same clock tick as that stat can change again, size and mtime
    alike, and its next stat says the same), and its digest covers `salt` (what else the
    value depends on). A file of another engine, torn or corrupt is ignored with a log line,
    as a shard is. `hits`, `misses` and `racy` count lookups and entries not kept."""

    def __init__(self, cache: CompileCache, scope: str, salt: str) -> None:
        name = hashlib.blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=16)
        self._cache = cache
        self._where = os.path.join(cache._root, name.hexdigest() + INDEX_SUFFIX)
        self._salt = salt
        self._stored: dict[str, tuple[bytes, object]] | None = None
        self._kept: dict[str, tuple[bytes, object]] = {}
        self._changed = False
        self.hits = self.misses = self.racy = 0

    def get(self, key: str, signature: StackSignature) -> object | None:
        """The value put under `key` with this signature, if there is a sound one."""
        found = self._read().get(key)
        if isinstance(found, tuple) and len(found) == 2 and found[0] == self._digest(signature):
            self._kept[key] = found
            self.hits += 1
            return found[1]
        self.misses += 1
        return None

    def put(self, key: str, signature: StackSignature, value: object, taken_ns: int) -> None:
        """Keep `value` under `key` for the folder's signature, taken at `taken_ns` (the wall
        clock just before the stat calls) before the files it depends on were read."""
        from txcl.loader import RACY_MARGIN_NS  # one home for the margin the loader trusts too

        self._changed = True
        if any(entry[3] >= taken_ns - RACY_MARGIN_NS for entry in signature):
            self.racy += 1
            self._kept.pop(key, None)
            return
        self._kept[key] = (self._digest(signature), value)

    def flush(self) -> None:
        if self._changed or (self._stored is not None and self._stored.keys() != self._kept.keys()):
            self._cache._write_sealed(self._where, {"entries": self._kept})
            self._stored, self._changed = dict(self._kept), False

    def _read(self) -> dict[str, tuple[bytes, object]]:
        if self._stored is None:
            found = self._cache._read_sealed(self._where) if self._cache._readable else None
            entries = None if found is None else found.get("entries")
            if found is not None and not isinstance(entries, dict):
                self._cache._say("corrupt", "compile cache %s holds no entries", self._where)
            self._stored = entries if isinstance(entries, dict) else {}
        return self._stored

    def _digest(self, signature: StackSignature) -> bytes:
        text = f"{self._salt}\0{signature!r}".encode("utf-8", "surrogatepass")
        return hashlib.blake2b(text, digest_size=_DIGEST_BYTES).digest()


def file_signature(path: str | os.PathLike[str]) -> StackSignature | None:
    """A file's signature for a StatIndex, as stack_signature gives it for a folder's
    entries (the link followed); None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ((os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),)


def _key(path: str, text: str) -> bytes:
    return hashlib.sha256(f"{path}\0{text}".encode("utf-8", "surrogatepass")).digest()


# --- the encoding ----------------------------------------------------------------------------
# The syntax tree is frozen slotted dataclasses; pickle's default for them sets each field on
# load through object.__setattr__. Reducing each to (class, field values) instead calls the
# constructor once per node, which loads faster (bench/README.md, the scale section).


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


class _Reducers(dict[type, Callable[[Any], Any]]):
    """How pickle reduces each class it meets (a Pickler's dispatch_table): an engine
    dataclass to (class, field values), other classes as copyreg or pickle's default says;
    found once per class, so that no object of a known class raises a KeyError. Unlike a
    reducer_override, it is not called for the tuples, lists and dicts between."""

    def __missing__(self, cls: type) -> Callable[[Any], Any]:
        if dataclasses.is_dataclass(cls) and cls.__module__.startswith(_ENGINE_PACKAGE + "."):
            reduce = _field_reducer(cls)
        elif issubclass(cls, type):
            raise KeyError(cls)  # a class itself: pickle saves it by name
        else:
            reduce = copyreg.dispatch_table.get(cls, _DEFAULT_REDUCE)
        self[cls] = reduce
        return reduce


# what pickle calls for an object no dispatch table knows
_DEFAULT_REDUCE: Final = operator.methodcaller("__reduce_ex__", pickle.HIGHEST_PROTOCOL)


def _field_reducer(cls: type) -> Callable[[Any], Any]:
    """An engine dataclass reduced to (class, field values)."""
    names = _field_names(cls)
    if len(names) == 1:
        (name,) = names
        return functools.partial(_reduce_one, cls, name)
    fields = operator.attrgetter(*names) if names else lambda obj: ()
    return functools.partial(_reduce_many, cls, fields)


def _reduce_one(cls: type, name: str, obj: Any) -> tuple[type, tuple[Any]]:
    return cls, (getattr(obj, name),)


def _reduce_many(cls: type, fields: Callable[[Any], tuple[Any, ...]], obj: Any) -> tuple[Any, ...]:
    return cls, fields(obj)


_REDUCERS: Final = _Reducers()


def encode_entry(entry: CachedFile) -> bytes:
    """An entry as the cache keeps it (put_encoded)."""
    return _dumps(entry)


def _dumps(entry: object) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _REDUCERS
    pickler.dump(entry)
    return out.getvalue()
