"""One runtime: the config, the op registry, the compiled OPS tree and every head's parts
over them, built together and never changed after. A reload builds the next one aside
(txcl.chassis.reload); a head's work keeps the runtime it started with.

The next runtime is built over the serving one's tree: stacks whose folders did not change
are the same objects in both (txcl.loader), so a reload compiles what changed and the
memory of the rest is not duplicated. Rule files are checked through the compile cache
under `<state-dir>/cache/` unless it is turned off (`txco serve --no-cache`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from txcl.chassis.config import ConfigError, ConfigFile, config_problem, load_config
from txcl.chassis.head import Engine, Head
from txcl.compile_cache import CompileCache
from txcl.errors import Problem, TxclError
from txcl.loader import RACY_MARGIN_NS, LazyStacks, Scan, Tree, load_tree, with_registry
from txcl.ops import OpRegistry

# What the watcher compares: (path, mtime in ns, size) of every file it watches.
Fingerprint = tuple[tuple[str, int, int], ...]

CACHE_DIR = "cache"  # under the state dir

# (inode, size, mtime_ns, ctime_ns) of the config file a runtime read, if it had settled.
ConfigKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class Preloaded:
    """An OPS tree loaded before the serving process started (by the parent of --workers),
    and the fingerprint of the watched files taken just before that load."""

    tree: Tree
    fingerprint: Fingerprint


class Places(Protocol):
    """The places the chassis works from (`--ops`, `--config`, `--state-dir`)."""

    @property
    def ops_dir(self) -> Path: ...

    @property
    def config_file(self) -> Path | None: ...

    @property
    def state_dir(self) -> Path: ...


@dataclass(frozen=True)
class Runtime:
    """Everything one delivery needs, compiled together. Never changed after it is built."""

    settings: Places
    config: ConfigFile
    tree: Tree
    registry: OpRegistry
    heads: Mapping[str, Any]  # head name -> that head's parts (Head.build)
    version: int
    loaded_at: float  # wall clock
    problems: tuple[Problem, ...] = ()  # warnings, and the errors of the failed stacks
    fingerprint: Fingerprint = field(default=(), repr=False)
    config_key: ConfigKey | None = field(default=None, repr=False)  # see config_key()

    @property
    def failed_stacks(self) -> tuple[StackFailure, ...]:
        """The stacks whose files have errors, by name: each still serving its last good
        version (a reload) or not served at all (at start, or a stack new in this version)."""
        tree = self.tree
        return tuple(StackFailure(name, name in tree.held, tree.failures.get(name, ()))
                     for name in sorted(tree.rejected))


@dataclass(frozen=True)
class StackFailure:
    """A stack whose new version did not go live, and why."""

    stack: str
    serving: bool  # its last good version still serves; else its mail gets 451 4.3.0
    problems: tuple[Problem, ...]


class ReloadFailed(Exception):
    """The next runtime could not be built; carries every problem found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def load_ops_tree(
    settings: Places,
    registry: OpRegistry | None,
    *,
    previous: Tree | None = None,
    compile_cache: bool = True,
    lazy: bool = False,
    scan: Scan | None = None,
    changed: AbstractSet[str] | None = None,
) -> Tree:
    """The `--ops` tree through the compile cache under the state dir (unless turned off).
    `lazy`, `scan` and `changed` are as for load_tree (a lazy tree writes its cache when
    completed)."""
    cache = CompileCache(Path(settings.state_dir) / CACHE_DIR) if compile_cache else None
    tree = load_tree(settings.ops_dir, registry, cache=cache, previous=previous, lazy=lazy,
                     scan=scan, changed=changed)
    if cache is not None and not lazy:
        cache.flush()
    return tree


def config_key(path: Path | None) -> ConfigKey | None:
    """What identifies the config file's content without reading it, if it was last written
    long enough ago (RACY_MARGIN_NS, as the loader trusts a stack folder); else None."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mtime_ns >= time.time_ns() - RACY_MARGIN_NS:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def build_runtime(
    settings: Places,
    version: int,
    heads: Sequence[Head],
    *,
    trace_sink: Callable[..., Any] | None = None,
    fingerprint: Fingerprint = (),
    strict: bool = True,
    previous: Tree | None = None,
    compile_cache: bool = True,
    preloaded: Tree | None = None,
    lazy: bool = False,
    scan: Scan | None = None,
    serving: Runtime | None = None,
    changed: AbstractSet[str] | None = None,
) -> Runtime:
    """Read the config and the OPS tree and compile everything; ReloadFailed lists all problems.

    Config and ops problems are reported together with the tree's, so one failed reload
    shows the operator everything that needs fixing. Errors in a stack's files keep that
    stack's new version out and no more: `previous` (the tree this runtime replaces) goes on
    serving its version of the stack, and the other stacks' changes go live. `strict`
    (every reload) refuses, as a whole, a configuration error, an error in the tree outside
    any stack (a misnamed tenant folder, hiding its stacks), and a failed stack that served
    until now but whose last good version cannot serve any more (it EXECs an op the new
    configuration removed), so a reload never takes a served stack out of service. At start
    (`strict=False`) there is no last good version: a stack with errors is not served and
    its problems are reported. `previous`'s unchanged stacks are taken over, not compiled
    again.
    `preloaded` is a tree loaded just before (by the parent of --workers, before the fork):
    it is used as it is, only its EXECs checked against this registry, so that a worker
    does not touch (and so copy) the pages it shares with the parent and its siblings.
    `lazy` compiles each stack when first needed (txcl.loader.LazyStacks; `over_tree` swaps
    in the completed tree); `scan` is a walk of `--ops` taken just before. The config of
    `serving` (the runtime this one replaces) is taken over if its file did not change.
    `changed` names the stacks and tenants that may have changed (load_tree's `changed`).
    """
    problems: list[Problem] = []
    key = config_key(settings.config_file)
    if serving is not None and key is not None and serving.config_key == key:
        config = serving.config
    else:
        try:
            config = load_config(settings.config_file, [head.name for head in heads])
        except ConfigError as err:
            problems.append(config_problem(err))
            config = ConfigFile()
            key = None
    try:
        registry = OpRegistry.from_config(config.ops, config.base_dir)
    except TxclError as err:
        problems.extend(err.problems)
        registry = OpRegistry.default()
    tree: Tree | None
    try:
        if preloaded is not None:
            tree = with_registry(preloaded, registry)
        else:
            tree = load_ops_tree(settings, registry, previous=previous,
                                 compile_cache=compile_cache, lazy=lazy, scan=scan,
                                 changed=changed)
    except TxclError as err:
        problems.extend(err.problems)
        tree = None
    tree_problems = tree.problems if tree is not None else ()
    if strict and tree is not None:
        problems.extend(_reload_blockers(tree, previous))
    if tree is None:
        raise ReloadFailed(problems)
    parts = _build_heads(heads, Engine(config, registry, tree, trace_sink), problems)
    if problems:
        listed = set(problems)  # refused as a whole: report what else needs fixing, too
        problems.extend(p for p in tree_problems if p.severity == "error" and p not in listed)
        raise ReloadFailed(problems)
    return Runtime(
        settings=settings,
        config=config,
        tree=tree,
        registry=registry,
        heads=MappingProxyType(parts),
        version=version,
        loaded_at=time.time(),
        problems=tree_problems,
        fingerprint=fingerprint,
        config_key=key,
    )


def _reload_blockers(tree: Tree, previous: Tree | None) -> list[Problem]:
    """The errors of `tree` that refuse a reload as a whole: those outside any stack, and
    those of a stack served until now that has no version left to serve."""
    in_stacks = {p for found in tree.failures.values() for p in found}
    blockers = [p for p in tree.problems if p.severity == "error" and p not in in_stacks]
    was_served = previous.stacks if previous is not None else {}
    for name in sorted(tree.rejected - tree.held):
        if name in was_served:
            blockers.extend(tree.failures.get(name, ()))
    return blockers


def _build_heads(heads: Sequence[Head], engine: Engine, problems: list[Problem]
                 ) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for head in heads:
        try:
            parts[head.name] = head.build(engine)
        except ConfigError as err:
            problems.append(config_problem(err))
    return parts


def over_tree(runtime: Runtime, tree: Tree, heads: Sequence[Head],
              trace_sink: Callable[..., Any] | None = None) -> Runtime:
    """`runtime` (same config, registry and version) serving `tree` instead: the completed
    form of its lazily loaded tree. ReloadFailed if a head cannot be built over it."""
    problems: list[Problem] = []
    parts = _build_heads(heads, Engine(runtime.config, runtime.registry, tree, trace_sink),
                         problems)
    if problems:
        raise ReloadFailed(problems)
    return dataclasses.replace(runtime, tree=tree, heads=MappingProxyType(parts),
                               problems=tree.problems)


async def compile_if_pending(tree: Tree, stack: str) -> None:
    """Compile the stack `stack` of a lazily loaded tree now, in a worker thread, if it is not
    yet: a transaction routed to it runs it as its files are at its RCPT, and the event loop
    does not wait for the compile."""
    stacks = tree.stacks
    if isinstance(stacks, LazyStacks) and stacks.pending(stack):
        await asyncio.to_thread(stacks.load, stack)
