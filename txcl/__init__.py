"""TXCL: a declarative rule language for mail-driven operations, and its engine.

The public API shows the stages: text -> `parse` -> ast -> (compile, load) -> `Stack` ->
`Stack.run(envelope, RunPolicy)` -> `StackResult`.

    tree = load_tree("OPS")                       # every stack, every problem
    result = tree.stacks["acme/_mail"].run(envelope, RunPolicy(run_ops=False))

Names are imported on first use, so `import txcl` stays cheap for the LMTP head.
"""

from __future__ import annotations

import importlib

# typing.TYPE_CHECKING without importing typing: the trace file process loads this package
# for two small modules, and typing would be most of its memory (mypy reads this name alike).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txcl.fmt import format_source
    from txcl.loader import Tree, load_target, load_tree
    from txcl.parser import parse
    from txcl.runner import RunPolicy, Stack, StackResult

__all__ = [
    "RunPolicy",
    "Stack",
    "StackResult",
    "Tree",
    "format_source",
    "load_target",
    "load_tree",
    "parse",
]

_HOMES = {
    "parse": "txcl.parser",
    "format_source": "txcl.fmt",
    "load_tree": "txcl.loader",
    "load_target": "txcl.loader",
    "Tree": "txcl.loader",
    "Stack": "txcl.runner",
    "RunPolicy": "txcl.runner",
    "StackResult": "txcl.runner",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'txcl' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
