"""An OPS tree on disk -> compiled stacks, and every problem found on the way.

    OPS/<tenant>/<stack>/<stage>/<name>.txcl     rules; stages are non-negative integers
    OPS/<tenant>/<stack>/tests/<name>.yaml       the stack's test cases (not a stage)

Tenant names are `[a-z][a-z0-9-]*`, stack names `[a-z_][a-z0-9_-]*`, stage folders
canonical integers (`0`, `10`; not `010`). Files of a stage are taken in byte-wise sorted
name order. Anything else in the tree is a problem (txcl_load_error), never silently
ignored; `..` and symlinks that lead out of the root are refused.

Every file is parsed and compiled, so one load reports the problems of all of them. A stack
with any problem is not served (it is absent from `Tree.stacks`); the other stacks load.
A reload (`previous=`) keeps serving such a stack's last good version instead (`Tree.held`).
Asked to (`keep_files=True`, as `txcl lint` does), a load also keeps what it read of every
rule file (`Tree.read`), so a tool can look further without parsing the files again.

Two things keep a load's cost to what changed. A compile cache (txcl.compile_cache) holds
the syntax tree and problems of every file checked before, so an unchanged file is not
parsed again. And a load given the tree it replaces (`previous=`, as a reload does) takes
over each served stack whose folder did not change, the same Stack object, without
reading its files: a stack's signature is the (name, inode, size, mtime, ctime) of every
entry of its folder and stage folders (ctime, which no tool sets back, sees an edit whose
mtime was restored), and a signature is trusted only when all its mtimes are older than
the previous load by RACY_MARGIN_NS (as git's index does, so a write in the same clock tick
as that load is not missed).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from txcl import ast, inputs
from txcl.compile_cache import CachedFile, CompileCache
from txcl.compiler import CompiledRule, ExecStep, compile_file
from txcl.envelope import STACK_NAME, TENANT_NAME
from txcl.errors import Pos, Problem, TxclError, TxclLoadError
from txcl.ops import OpRegistry
from txcl.runner import Stack, Stage

LOAD_ERROR: Final = "txcl_load_error"
RULE_SUFFIX: Final = ".txcl"
TESTS_DIR: Final = "tests"
CASE_SUFFIXES: Final = (".yaml", ".yml")
SINGLE_FILE_STACK: Final = "test/_file"

STAGE_NAME: Final = re.compile(r"0|[1-9][0-9]{0,8}")

# A rule file larger than this is refused before it is read: rules are a few lines each, and
# a runaway file (a log written into OPS/ by mistake) would otherwise take minutes and
# gigabytes to parse.
MAX_RULE_FILE_BYTES: Final = 1 << 20

RACY_MARGIN_NS: Final = 2_000_000_000

# (name relative to the stack folder, inode, size, mtime_ns, ctime_ns) of every entry.
StackSignature = tuple[tuple[str, int, int, int, int], ...]


@dataclass(frozen=True)
class ReadFile:
    """One rule file as a load read it: its text, its syntax tree (None if it does not
    parse; decoded on first use when it came from the compile cache) and its parse or
    compile problems."""

    path: str
    source: str
    checked: CachedFile

    @property
    def file(self) -> ast.File | None:
        return self.checked.file

    @property
    def problems(self) -> tuple[Problem, ...]:
        return self.checked.problems


@dataclass(frozen=True)
class Tree:
    root: Path
    stacks: Mapping[str, Stack]  # "tenant/stack" -> Stack served: without problems, or held
    problems: tuple[Problem, ...]
    files: int  # .txcl files read
    case_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    rejected: AbstractSet[str] = frozenset()  # stacks whose files have problems
    read: Mapping[str, ReadFile] = field(default_factory=dict)  # path -> file, if kept
    parsed: int = 0  # files parsed by this load (not found in the compile cache)
    compiled: int = 0  # files compiled by this load (not taken over from `previous`)
    signatures: Mapping[str, StackSignature] = field(default_factory=dict)  # served stacks
    op_names: frozenset[str] | None = None  # the ops EXECs were checked against
    exec_ops: Mapping[str, frozenset[str]] = field(default_factory=dict)  # stack -> ops it EXECs
    started_ns: int = 0  # wall clock when this load began
    failures: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict)  # rejected -> why
    held: frozenset[str] = frozenset()  # rejected, yet serving `previous`'s version

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """No cyclic GC during a load. A load allocates heavily and keeps nearly all of it, so
    the collections it would trigger find little to free while scanning everything built so
    far again: a fifth of the CPU time of a 10,000-file load. Refcounting still frees what
    it can; the collector resumes (if it was on) right after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_Args = ParamSpec("_Args")
_Result = TypeVar("_Result")


def without_cyclic_gc(load: Callable[_Args, _Result]) -> Callable[_Args, _Result]:
    """`load`, run under no_cyclic_gc()."""

    @functools.wraps(load)
    def run(*args: _Args.args, **kwargs: _Args.kwargs) -> _Result:
        with no_cyclic_gc():
            return load(*args, **kwargs)

    return run


def _problem(message: str, pos: Pos | None = None) -> Problem:
    return Problem(LOAD_ERROR, message, pos)


def _byte_order(name: str) -> bytes:
    return os.fsencode(name)


class _Walker:
    """One load: the root's real path for escape checks, the registry, counters."""

    def __init__(
        self,
        root: Path,
        registry: OpRegistry | None,
        keep_files: bool = False,
        cache: CompileCache | None = None,
        check_only: bool = False,
        scan: Scan | None = None,
    ) -> None:
        self.root = root
        self.scan = scan
        self.real_root = os.path.realpath(root)
        self.registry = registry
        self.op_names = registry.names() if registry is not None else None
        self.files = 0
        self.parsed = 0
        self.compiled = 0
        self.read: dict[str, ReadFile] | None = {} if keep_files else None
        self.cache = cache
        self.check_only = check_only

    def entries(self, folder: str, problems: list[Problem]) -> list[os.DirEntry[str]]:
        """The folder's entries in byte-wise name order, without symlinks that escape, loop
        or lead nowhere (each a problem naming its path)."""
        scanned = None if self.scan is None else self.scan.entries.get(folder)
        try:
            if scanned is None:
                with os.scandir(folder) as it:
                    scanned = list(it)
        except OSError as err:
            problems.append(_problem(f"{folder}: cannot be read: {err.strerror or err}"))
            return []
        found = sorted(scanned, key=lambda e: _byte_order(e.name))
        kept = []
        for entry in found:
            if entry.is_symlink():
                refused = inputs.symlink_problem(entry.path, self.root, self.real_root)
                if refused:
                    problems.append(_problem(f"{entry.path}: {refused}"))
                    continue
                try:
                    entry.stat()  # follows the link once; is_dir() and is_file() reuse it
                except OSError as err:
                    problems.append(_problem(
                        f"{entry.path}: a symlink that cannot be followed: {err.strerror or err}"
                    ))
                    continue
            kept.append(entry)
        return kept

    def read_rules(self, path: str, problems: list[Problem]) -> tuple[CompiledRule, ...]:
        self.files += 1
        try:
            text = read_rule_source(path)
        except TxclLoadError as err:
            problems.extend(err.problems)
            return ()
        checked, rules = self.check(path, text)
        self.keep(ReadFile(path, text, checked))
        if checked.problems:
            problems.extend(checked.problems)
            return ()
        if self.check_only:
            return ()
        from txcl.lint import gate_problems  # what lint calls an error never goes live

        assert checked.file is not None, "a file without problems has parsed"
        gate = gate_problems(checked.file, text)
        if gate:
            problems.extend(gate)
            return ()
        if rules is None:  # found in the cache: compiling again gives what it gave then
            tree = checked.file
            assert tree is not None, "a file without problems has parsed"
            self.compiled += 1
            rules = compile_file(tree)
        self.check_ops(rules, problems)
        return rules

    def check(self, path: str, text: str) -> tuple[CachedFile, tuple[CompiledRule, ...] | None]:
        """The file's syntax tree and problems, from the cache or by parsing and compiling
        it (then also its compiled rules, if it compiled)."""
        if self.cache is not None:
            cached = self.cache.get(path, text)
            if cached is not None:
                return cached, None
        from txcl.parser import parse  # the parser builds its tables on first use

        self.parsed += 1
        tree: ast.File | None = None
        rules = None
        try:
            tree = parse(text, path)
            self.compiled += 1
            rules = compile_file(tree)
            checked = CachedFile(tree, ())
        except TxclError as err:
            checked = CachedFile(tree, err.problems)
        if self.cache is not None and not self.check_only:  # see load_tree's check_only
            self.cache.put(path, text, checked)
        return checked, rules

    def check_ops(self, rules: tuple[CompiledRule, ...], problems: list[Problem]) -> None:
        """An EXEC of an op the registry does not know is a problem."""
        if self.registry is not None:
            problems.extend(unknown_ops(rules, self.registry))

    def keep(self, read: ReadFile) -> None:
        if self.read is not None:
            self.read[read.path] = read

    def stage(self, number: int, folder: str, problems: list[Problem]) -> Stage:
        rules: list[CompiledRule] = []
        files: list[str] = []
        for entry in self.entries(folder, problems):
            if not entry.name.endswith(RULE_SUFFIX) or entry.name == RULE_SUFFIX:
                problems.append(
                    _problem(f"{entry.path}: a stage holds only <name>{RULE_SUFFIX} files")
                )
                continue
            if not entry.is_file():
                problems.append(_problem(f"{entry.path}: not a regular file"))
                continue
            files.append(entry.path)
            rules.extend(self.read_rules(entry.path, problems))
        return Stage(number, tuple(rules), tuple(files))

    def stack(
        self, name: str, folder: str, problems: list[Problem]
    ) -> tuple[Stack, tuple[Path, ...]]:
        stages: list[Stage] = []
        cases: list[Path] = []
        for entry in self.entries(folder, problems):
            if entry.name == TESTS_DIR and entry.is_dir():
                cases.extend(
                    Path(e.path)
                    for e in self.entries(entry.path, problems)
                    if e.name.endswith(CASE_SUFFIXES) and e.is_file()
                )
            elif STAGE_NAME.fullmatch(entry.name) and entry.is_dir():
                stages.append(self.stage(int(entry.name), entry.path, problems))
            else:
                problems.append(
                    _problem(
                        f"{entry.path}: a stack folder holds only stage folders "
                        f"(0, 1, 10, ...) and {TESTS_DIR}/"
                    )
                )
        return Stack(name, tuple(stages)), tuple(cases)


def read_rule_source(path: str) -> str:
    """The text of a rule file, without a leading byte order mark. Raises TxclLoadError if
    it is not a regular file, cannot be read, is larger than MAX_RULE_FILE_BYTES (known from
    its size, before reading it) or is not UTF-8."""
    try:
        return inputs.read_text(path, MAX_RULE_FILE_BYTES)
    except inputs.TooLarge as err:
        raise TxclLoadError(_too_big(path, err.size)) from None
    except inputs.InputError as err:
        raise TxclLoadError(err.problem(LOAD_ERROR)) from None


def _too_big(path: str, size: int) -> Problem:
    shown = inputs.describe_size(size)
    limit = f"{MAX_RULE_FILE_BYTES / (1 << 20):g} MiB"
    message = f"rule file is {shown}; the limit is {limit} — split it into several files"
    return _problem(message, Pos(path, 1, 1))


def _exec_steps(rules: Iterable[CompiledRule]) -> Iterator[ExecStep]:
    for rule in rules:
        for step in rule.steps:
            if isinstance(step, ExecStep):
                yield step


def unknown_ops(rules: Iterable[CompiledRule], registry: OpRegistry) -> list[Problem]:
    """A problem for each EXEC of an op the registry does not know."""
    return [_problem(f"unknown op {step.op!r} (EXEC {step.uri})", step.pos)
            for step in _exec_steps(rules) if step.op not in registry]


def stack_rules(stack: Stack) -> Iterator[CompiledRule]:
    for stage in stack.stages:
        yield from stage.rules


def with_registry(tree: Tree, registry: OpRegistry) -> Tree:
    """`tree` with its EXECs checked against `registry` (it was loaded without one, or with
    another): a stack that EXECs an unknown op is taken out, with its problems. The stacks
    are not walked unless their EXECs (`Tree.exec_ops`) name an unknown op."""
    names = registry.names()
    bad = {name for name, ops in tree.exec_ops.items() if not ops <= names}
    if not bad:  # nothing parsed or compiled for it: the counts are of this load
        return dataclasses.replace(tree, op_names=names, parsed=0, compiled=0)
    failures = {name: tuple(unknown_ops(stack_rules(tree.stacks[name]), registry))
                for name in sorted(bad)}
    problems = [p for found in failures.values() for p in found]

    def served(table: Mapping[str, _Value]) -> dict[str, _Value]:
        return {name: value for name, value in table.items() if name not in bad}

    return dataclasses.replace(
        tree, stacks=served(tree.stacks), problems=(*tree.problems, *problems),
        rejected=tree.rejected | bad, failures={**tree.failures, **failures},
        signatures=served(tree.signatures),
        exec_ops=served(tree.exec_ops), op_names=names, parsed=0, compiled=0)


_Value = TypeVar("_Value")


@dataclass(frozen=True)
class Scan:
    """One walk of a folder: the entries of each folder under it (symlinked folders are not
    entered), as os.scandir gave them; an entry keeps the stat it was asked for, so a load
    over the scan (load_tree's `scan`) stats nothing the walk stat'ed."""

    entries: Mapping[str, list[os.DirEntry[str]]]  # folder path -> its entries
    started_ns: int = 0  # wall clock when the walk began


def scan_tree(root: str) -> Scan:
    """Every folder under `root` read once. A folder that cannot be read is left out (a load
    reads it again, and reports why it cannot)."""
    started_ns = time.time_ns()
    entries: dict[str, list[os.DirEntry[str]]] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                found = entries[folder] = list(it)
        except OSError:
            continue
        for entry in found:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
            except OSError:
                continue
    return Scan(entries, started_ns)


def stack_signature(
    folder: str, scan: Scan | None = None, into: dict[str, list[os.DirEntry[str]]] | None = None
) -> StackSignature:
    """What identifies a stack folder's content without reading it: (name, inode, size,
    mtime_ns, ctime_ns) of each entry of the folder and of its subfolders, sorted. A
    symlink counts as what it leads to (itself, if it leads nowhere). Entries found in
    `scan` are not read again; the folders read are put `into` it (a Scan's entries, for a
    load of the stack that follows)."""
    out: list[tuple[str, int, int, int, int]] = []
    pending = [("", folder)]
    while pending:
        prefix, path = pending.pop()
        found = None if scan is None else scan.entries.get(path)
        try:
            if found is None:
                with os.scandir(path) as it:
                    found = list(it)
                if into is not None:
                    into[path] = found
        except OSError:
            out.append((prefix, -1, -1, -1, -1))
            continue
        for entry in found:
            name = prefix + entry.name
            try:
                st = entry.stat()
            except OSError:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            if not prefix and stat.S_ISDIR(st.st_mode):  # a link that loops is not followed
                pending.append((name + "/", entry.path))
    out.sort()
    return tuple(out)


def _last_good(previous: Tree | None, name: str, op_names: frozenset[str] | None) -> bool:
    """Whether the previous load served stack `name` with EXECs all still known."""
    if previous is None or name not in previous.stacks:
        return False
    return op_names is None or previous.exec_ops.get(name, frozenset()) <= op_names


def _reusable(previous: Tree | None, name: str, signature: StackSignature) -> Stack | None:
    """The previous load's Stack `name`, if its folder is as that load found it."""
    if previous is None or previous.signatures.get(name) != signature:
        return None
    trusted_before = previous.started_ns - RACY_MARGIN_NS
    if any(entry[3] >= trusted_before for entry in signature):  # mtimes; ctime: see above
        return None
    return previous.stacks.get(name)


@dataclass(frozen=True)
class _StackLoad:
    """What loading one stack folder found."""

    stack: Stack | None  # None: not served (its problems say why)
    problems: tuple[Problem, ...]
    cases: tuple[Path, ...]
    signature: StackSignature
    ops: frozenset[str]  # the ops its EXECs name
    held: bool = False  # has problems, yet serves `previous`'s version (its old signature)


def _unchanged(previous: Tree | None, name: str) -> Stack | None:
    """The previous load's Stack `name`, served without problems, for a caller that knows its
    folder did not change (a change feed): taken over under its old signature, unread."""
    if previous is None or name in previous.held or name not in previous.signatures:
        return None
    return previous.stacks.get(name)


def _load_stack(walker: _Walker, name: str, folder: str, previous: Tree | None,
                scan: Scan | None = None, unchanged: bool = False) -> _StackLoad:
    """One stack: taken over from `previous` if its folder did not change, else compiled.
    `unchanged`: the caller knows the folder did not change, so its signature is not read."""
    problems: list[Problem] = []
    kept = _unchanged(previous, name) if unchanged else None
    if kept is not None and previous is not None:
        signature = previous.signatures[name]
    else:
        signature = () if walker.check_only else stack_signature(folder, scan)
        kept = _reusable(previous, name, signature) if previous is not None else None
    if kept is not None and previous is not None:
        stack, cases = kept, previous.case_files.get(name, ())
        walker.files += sum(len(stage.files) for stage in stack.stages)
        ops = previous.exec_ops.get(name, frozenset())
        if walker.registry is not None and not ops <= (walker.op_names or frozenset()):
            problems.extend(unknown_ops(stack_rules(stack), walker.registry))
    else:
        stack, cases = walker.stack(name, folder, problems)
        ops = frozenset(step.op for step in _exec_steps(stack_rules(stack)))
    if problems and not walker.check_only and _last_good(previous, name, walker.op_names):
        assert previous is not None
        return _StackLoad(previous.stacks[name], tuple(problems), cases,
                          previous.signatures.get(name, ()),
                          previous.exec_ops.get(name, frozenset()), held=True)
    served = None if problems or walker.check_only else stack
    return _StackLoad(served, tuple(problems), cases, signature, ops)


# What a walk found, in order: a problem, or the name of a stack whose problems go there.
_Layout = list[Problem | str]


def _stack_folders(walker: _Walker, root: Path, problems: _Layout,
                   known: Mapping[str, list[str]] | None = None) -> dict[str, str]:
    """"tenant/stack" -> its folder, in walk order; what is not a tenant or stack folder is a
    problem. `problems` gets each problem, and each stack's name, in walk order. `known`:
    the stacks of tenants whose folders did not change, which are not listed again."""
    folders: dict[str, str] = {}

    def entries(folder: str) -> list[os.DirEntry[str]]:
        found: list[Problem] = []
        kept = walker.entries(folder, found)
        problems.extend(found)
        return kept

    for tenant in entries(str(root)):
        if not (TENANT_NAME.fullmatch(tenant.name) and tenant.is_dir()):
            problems.append(
                _problem(f"{tenant.path}: expected a tenant folder named [a-z][a-z0-9-]*")
            )
            continue
        names = None if known is None else known.get(tenant.name)
        if names is not None:
            for name in names:
                folders[name] = os.path.join(tenant.path, name.partition("/")[2])
                problems.append(name)
            continue
        for stack_entry in entries(tenant.path):
            if not (STACK_NAME.fullmatch(stack_entry.name) and stack_entry.is_dir()):
                problems.append(
                    _problem(f"{stack_entry.path}: expected a stack folder named [a-z_][a-z0-9_-]*")
                )
                continue
            name = f"{tenant.name}/{stack_entry.name}"
            folders[name] = stack_entry.path
            problems.append(name)
    return folders


@without_cyclic_gc
def load_tree(
    root: Path | str,
    registry: OpRegistry | None = None,
    *,
    keep_files: bool = False,
    cache: CompileCache | None = None,
    previous: Tree | None = None,
    check_only: bool = False,
    lazy: bool = False,
    scan: Scan | None = None,
    changed: AbstractSet[str] | None = None,
) -> Tree:
    """Load `OPS/`: every tenant, stack, stage and file. Never raises for bad content.

    With a registry, an EXEC of an op it does not know is a problem of that stack. With
    keep_files, `Tree.read` holds every rule file read, by path. With a cache, files
    checked before are not parsed again. With `previous` (the tree this load replaces),
    its stacks whose folders did not change are taken over as they are, and a stack that
    now has problems keeps its previous version served (listed in `Tree.held`) with its
    previous signature, so that the next load tries its files again. `check_only`
    checks every file (problems, `Tree.read`) but builds no stack (`Tree.stacks` is empty)
    and writes nothing to the cache: its caller (`txcl lint`) writes each entry once, with
    the findings it adds. `lazy` only finds the stack folders: each stack is compiled when
    first asked for (`LazyStacks`), and `complete()` compiles the rest. `scan` is a walk of
    the root taken just before (`scan_tree`): its entries are used instead of reading the
    folders again. `changed` (from a change feed; None: anything may have) names the stacks
    ("tenant/stack") and tenants ("tenant") whose folders may have changed since `previous`:
    every other stack `previous` served is taken over without reading its signature.
    """
    started_ns = time.time_ns() if scan is None else scan.started_ns
    root = Path(root)
    if previous is not None and previous.root != root:
        previous = None
    walker = _Walker(root, registry, keep_files, cache, check_only, scan)
    if not root.is_dir():
        return Tree(root, {}, (_problem(f"{root}: not a folder"),), 0)
    problems: _Layout = []
    folders = _stack_folders(walker, root, problems, _unchanged_tenants(previous, changed))
    if lazy:
        stacks = LazyStacks(walker, folders, problems)
        found = tuple(p for p in problems if isinstance(p, Problem))
        return Tree(root, stacks, found, 0, rejected=_LazyRejected(stacks),
                    read={} if walker.read is None else walker.read,  # filled as stacks load
                    op_names=walker.op_names, started_ns=started_ns)
    loads = {name: _load_stack(walker, name, folder, previous, scan,
                               changed is not None and not _may_have_changed(name, changed))
             for name, folder in folders.items()}
    return _tree_of(walker, root, problems, loads, started_ns)


def _unchanged_tenants(previous: Tree | None, changed: AbstractSet[str] | None
                       ) -> dict[str, list[str]] | None:
    """tenant -> its stacks as `previous` found them, for each tenant not in `changed`; None
    if that is not known, or `previous` found problems outside its stacks (a listing finds
    them again)."""
    if previous is None or changed is None:
        return None
    in_stacks = {p for found in previous.failures.values() for p in found}
    if any(p not in in_stacks for p in previous.problems):
        return None
    touched = {name.partition("/")[0] for name in changed}
    known: dict[str, list[str]] = {}
    for name in previous.case_files:
        tenant = name.partition("/")[0]
        if tenant not in touched:
            known.setdefault(tenant, []).append(name)
    return known


def _may_have_changed(name: str, changed: AbstractSet[str]) -> bool:
    return name in changed or name.partition("/")[0] in changed


def _tree_of(walker: _Walker, root: Path, layout: _Layout, loads: Mapping[str, _StackLoad],
             started_ns: int) -> Tree:
    served = {name: load for name, load in loads.items() if load.stack is not None}
    problems = [p for item in layout
                for p in ((item,) if isinstance(item, Problem) else loads[item].problems)]
    return Tree(
        root,
        {name: load.stack for name, load in served.items() if load.stack is not None},
        tuple(problems),
        walker.files,
        {name: load.cases for name, load in loads.items()},
        frozenset(name for name, load in loads.items() if load.problems),
        walker.read or {},
        failures={name: load.problems for name, load in loads.items() if load.problems},
        held=frozenset(name for name, load in loads.items() if load.held),
        parsed=walker.parsed,
        compiled=walker.compiled,
        signatures={name: load.signature for name, load in served.items()},
        exec_ops={name: load.ops for name, load in served.items()},
        op_names=walker.op_names,
        started_ns=started_ns,
    )


class LazyStacks(Mapping[str, Stack]):
    """The stacks of a tree loaded with `lazy=True`, each compiled when first asked for (one
    at a time, then kept). A stack whose files have problems is then absent, and in
    `rejected`; iterating names every stack not known to have problems."""

    def __init__(self, walker: _Walker, folders: dict[str, str], layout: _Layout) -> None:
        self._walker = walker
        self._folders = folders
        self._layout = layout
        self._loads: dict[str, _StackLoad] = {}
        self._rejected: set[str] = set()  # loaded, with problems
        self._lock = threading.Lock()

    def load(self, name: str) -> _StackLoad:
        found = self._loads.get(name)
        if found is None:
            with self._lock:
                found = self._loads.get(name)
                if found is None:
                    found = _load_stack(self._walker, name, self._folders[name], None)
                    if found.stack is None:
                        self._rejected.add(name)
                    self._loads[name] = found
        return found

    def pending(self, name: str) -> bool:
        """Whether `name` is a stack of this tree not compiled yet."""
        return name in self._folders and name not in self._loads

    def __getitem__(self, name: str) -> Stack:
        if name not in self._folders:
            raise KeyError(name)
        stack = self.load(name).stack
        if stack is None:
            raise KeyError(name)
        return stack

    def __iter__(self) -> Iterator[str]:
        loads = self._loads
        return iter([name for name in self._folders
                     if (found := loads.get(name)) is None or found.stack is not None])

    def __len__(self) -> int:  # O(1): a delivery asks (`stacks or {}`)
        return len(self._folders) - len(self._rejected)

    def compiled(self) -> dict[str, Stack]:
        """The stacks compiled so far, without compiling any."""
        return {name: load.stack for name, load in list(self._loads.items())
                if load.stack is not None}


class _LazyRejected(AbstractSet[str]):
    """The stacks of a LazyStacks not served: asking about one compiles it; iterating names
    those known so far."""

    def __init__(self, stacks: LazyStacks) -> None:
        self._stacks = stacks

    def __contains__(self, name: object) -> bool:
        stacks = self._stacks
        return isinstance(name, str) and name in stacks._folders and (
            stacks.load(name).stack is None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._stacks._rejected))

    def __len__(self) -> int:
        return len(self._stacks._rejected)


@without_cyclic_gc
def complete(tree: Tree, pause: Callable[[], None] | None = None) -> Tree:
    """A lazily loaded tree with every stack compiled, as load_tree would have returned it
    (the same Stack objects); its compile cache is written. Any other tree as it is.
    `pause` runs between two stacks (to let other threads in)."""
    stacks = tree.stacks
    if not isinstance(stacks, LazyStacks):
        return tree
    for name in stacks._folders:
        stacks.load(name)
        if pause is not None:
            pause()
    walker = stacks._walker
    if walker.cache is not None:
        walker.cache.flush()
    loads = {name: stacks._loads[name] for name in stacks._folders}
    done = _tree_of(walker, tree.root, stacks._layout, loads, tree.started_ns)
    walker.cache = None  # nothing is compiled any more: its shards need not stay in memory
    return done


def _stack_name_from(folder: Path) -> str:
    """`<tenant>/<stack>` from a stack folder's own and parent names, if they are valid."""
    tenant, stack = folder.parent.name, folder.name
    if TENANT_NAME.fullmatch(tenant) and STACK_NAME.fullmatch(stack):
        return f"{tenant}/{stack}"
    return SINGLE_FILE_STACK


def _is_stack_folder(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(
                e.is_dir() and (e.name == TESTS_DIR or STAGE_NAME.fullmatch(e.name)) for e in it
            )
    except OSError:
        return False


@without_cyclic_gc
def load_target(
    path: Path | str,
    registry: OpRegistry | None = None,
    *,
    keep_files: bool = False,
    cache: CompileCache | None = None,
    check_only: bool = False,
) -> Tree:
    """Load what a person points `txcl test` or `txcl lint` at.

    - a `.txcl` file: one stack "test/_file" with that file as stage 0;
    - a stage folder (`.../<tenant>/<stack>/<n>`): that stage alone, as its stack;
    - a stack folder (holds stage folders or tests/): that stack;
    - anything else: an OPS root, as load_tree().
    Stacks loaded from a folder outside a valid tenant/stack layout are named "test/_file".
    keep_files, cache and check_only are as for load_tree().
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():  # read_rules refuses a FIFO, a loop...
        walker = _Walker(path.parent, registry, keep_files, cache, check_only)
        problems: list[Problem] = []
        if not path.name.endswith(RULE_SUFFIX):
            problems.append(_problem(f"{path}: not a {RULE_SUFFIX} file"))
            return Tree(path, {}, tuple(problems), 0)
        rules = walker.read_rules(str(path), problems)
        stack = Stack(SINGLE_FILE_STACK, (Stage(0, rules, (str(path),)),))
        return _single(path, stack, problems, walker, ())
    if path.is_dir() and STAGE_NAME.fullmatch(path.name):
        walker = _Walker(path.parent, registry, keep_files, cache, check_only)
        problems = []
        stage = walker.stage(int(path.name), str(path), problems)
        stack = Stack(_stack_name_from(path.parent), (stage,))
        return _single(path, stack, problems, walker, ())
    if path.is_dir() and _is_stack_folder(path):
        walker = _Walker(path, registry, keep_files, cache, check_only)
        problems = []
        stack, case_files = walker.stack(_stack_name_from(path), str(path), problems)
        return _single(path, stack, problems, walker, case_files)
    return load_tree(path, registry, keep_files=keep_files, cache=cache, check_only=check_only)


def _single(
    root: Path, stack: Stack, problems: list[Problem], walker: _Walker, cases: tuple[Path, ...]
) -> Tree:
    read = walker.read or {}
    served, rejected = ({}, frozenset({stack.name})) if problems else ({stack.name: stack}, frozenset())
    return Tree(root, served, tuple(problems), walker.files, {stack.name: cases}, rejected, read,
                parsed=walker.parsed, compiled=walker.compiled, op_names=walker.op_names)
