"""An OPS tree on disk -> compiled stacks, and every problem found on the way.

    OPS/<tenant>/<stack>/<stage>/<name>.txcl     rules; stages are non-negative integers
    OPS/<tenant>/<stack>/tests/<name>.yaml       the stack's test cases (not a stage)

Tenant names are `[a-z][a-z0-9-]*`, stack names `[a-z_][a-z0-9_-]*`, stage folders
canonical integers (`0`, `10`; not `010`). Files of a stage are taken in byte-wise sorted
name order. Anything else in the tree is a problem (txcl_load_error), never silently
ignored; `..` and symlinks that lead out of the root are refused.

Every file is parsed and compiled, so one load reports the problems of all of them. A stack
with any problem is not served (it is absent from `Tree.stacks`); the other stacks load.
Asked to (`keep_files=True`, as `txcl lint` does), a load also keeps what it read of every
rule file (`Tree.read`), so a tool can look further without parsing the files again.
"""

from __future__ import annotations

import functools
import gc
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from txcl import ast, inputs
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


@dataclass(frozen=True)
class ReadFile:
    """One rule file as a load read it: its text, its syntax tree (None if it does not
    parse) and its parse or compile problems."""

    path: str
    source: str
    file: ast.File | None
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Tree:
    root: Path
    stacks: Mapping[str, Stack]  # "tenant/stack" -> Stack, only stacks without problems
    problems: tuple[Problem, ...]
    files: int  # .txcl files read
    case_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    rejected: frozenset[str] = frozenset()  # stacks not served because of their problems
    read: Mapping[str, ReadFile] = field(default_factory=dict)  # path -> file, if kept

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

    def __init__(self, root: Path, registry: OpRegistry | None, keep_files: bool = False) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.registry = registry
        self.files = 0
        self.read: dict[str, ReadFile] | None = {} if keep_files else None

    def entries(self, folder: str, problems: list[Problem]) -> list[os.DirEntry[str]]:
        """The folder's entries in byte-wise name order, without symlinks that escape, loop
        or lead nowhere (each a problem naming its path)."""
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: _byte_order(e.name))
        except OSError as err:
            problems.append(_problem(f"{folder}: cannot be read: {err.strerror or err}"))
            return []
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
        from txcl.parser import parse  # the parser builds its tables on first use

        tree: ast.File | None = None
        try:
            tree = parse(text, path)
            rules = compile_file(tree)
        except TxclError as err:
            problems.extend(err.problems)
            self.keep(ReadFile(path, text, tree, err.problems))
            return ()
        self.keep(ReadFile(path, text, tree, ()))
        if self.registry is not None:
            for rule in rules:
                for step in rule.steps:
                    if isinstance(step, ExecStep) and step.op not in self.registry:
                        problems.append(
                            _problem(f"unknown op {step.op!r} (EXEC {step.uri})", step.pos)
                        )
        return rules

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


@without_cyclic_gc
def load_tree(
    root: Path | str, registry: OpRegistry | None = None, *, keep_files: bool = False
) -> Tree:
    """Load `OPS/`: every tenant, stack, stage and file. Never raises for bad content.

    With a registry, an EXEC of an op it does not know is a problem of that stack. With
    keep_files, `Tree.read` holds every rule file read, by path.
    """
    root = Path(root)
    walker = _Walker(root, registry, keep_files)
    problems: list[Problem] = []
    stacks: dict[str, Stack] = {}
    cases: dict[str, tuple[Path, ...]] = {}
    rejected: set[str] = set()
    if not root.is_dir():
        problems.append(_problem(f"{root}: not a folder"))
        return Tree(root, stacks, tuple(problems), 0)
    for tenant in walker.entries(str(root), problems):
        if not (TENANT_NAME.fullmatch(tenant.name) and tenant.is_dir()):
            problems.append(
                _problem(f"{tenant.path}: expected a tenant folder named [a-z][a-z0-9-]*")
            )
            continue
        for stack_entry in walker.entries(tenant.path, problems):
            if not (STACK_NAME.fullmatch(stack_entry.name) and stack_entry.is_dir()):
                problems.append(
                    _problem(f"{stack_entry.path}: expected a stack folder named [a-z_][a-z0-9_-]*")
                )
                continue
            name = f"{tenant.name}/{stack_entry.name}"
            stack_problems: list[Problem] = []
            stack, case_files = walker.stack(name, stack_entry.path, stack_problems)
            cases[name] = case_files
            problems.extend(stack_problems)
            if stack_problems:
                rejected.add(name)
            else:
                stacks[name] = stack
    return Tree(
        root,
        stacks,
        tuple(problems),
        walker.files,
        cases,
        frozenset(rejected),
        walker.read or {},
    )


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
    path: Path | str, registry: OpRegistry | None = None, *, keep_files: bool = False
) -> Tree:
    """Load what a person points `txcl test` or `txcl lint` at.

    - a `.txcl` file: one stack "test/_file" with that file as stage 0;
    - a stage folder (`.../<tenant>/<stack>/<n>`): that stage alone, as its stack;
    - a stack folder (holds stage folders or tests/): that stack;
    - anything else: an OPS root, as load_tree().
    Stacks loaded from a folder outside a valid tenant/stack layout are named "test/_file".
    keep_files is as for load_tree().
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():  # read_rules refuses a FIFO, a loop...
        walker = _Walker(path.parent, registry, keep_files)
        problems: list[Problem] = []
        if not path.name.endswith(RULE_SUFFIX):
            problems.append(_problem(f"{path}: not a {RULE_SUFFIX} file"))
            return Tree(path, {}, tuple(problems), 0)
        rules = walker.read_rules(str(path), problems)
        stack = Stack(SINGLE_FILE_STACK, (Stage(0, rules, (str(path),)),))
        return _single(path, stack, problems, walker, ())
    if path.is_dir() and STAGE_NAME.fullmatch(path.name):
        walker = _Walker(path.parent, registry, keep_files)
        problems = []
        stage = walker.stage(int(path.name), str(path), problems)
        stack = Stack(_stack_name_from(path.parent), (stage,))
        return _single(path, stack, problems, walker, ())
    if path.is_dir() and _is_stack_folder(path):
        walker = _Walker(path, registry, keep_files)
        problems = []
        stack, case_files = walker.stack(_stack_name_from(path), str(path), problems)
        return _single(path, stack, problems, walker, case_files)
    return load_tree(path, registry, keep_files=keep_files)


def _single(
    root: Path, stack: Stack, problems: list[Problem], walker: _Walker, cases: tuple[Path, ...]
) -> Tree:
    read = walker.read or {}
    if problems:
        rejected = frozenset({stack.name})
        return Tree(root, {}, tuple(problems), walker.files, {stack.name: cases}, rejected, read)
    return Tree(root, {stack.name: stack}, (), walker.files, {stack.name: cases}, read=read)
