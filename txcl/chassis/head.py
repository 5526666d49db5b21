"""What the chassis needs from a head (`lmtp` today; `web`, `admin`, `cron`, `tcp` next).

A head builds its own parts of each runtime (its config section validated, its router, its
deliverer), binds its listeners once in the parent for `--workers`, and runs a server in
each serving process over whatever runtime is current.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from txcl.chassis.balance import WorkerSlot
from txcl.chassis.config import ConfigFile
from txcl.loader import Tree
from txcl.ops import OpRegistry

if TYPE_CHECKING:
    from txcl.chassis.reload import RuntimeHolder


class BindError(Exception):
    """A listen address that cannot be used. The message names it."""


@dataclass(frozen=True)
class Engine:
    """What every head's parts of one runtime are built over: one config file, one op
    registry, one compiled OPS tree, one trace writer."""

    config: ConfigFile
    registry: OpRegistry
    tree: Tree
    trace_sink: Callable[..., Any] | None = None


class HeadServer(Protocol):
    """One head's listeners in one serving process."""

    @property
    def bound(self) -> list[str]:
        """The addresses it listens on, for the log."""
        ...

    @property
    def grace_s(self) -> float:
        """How long stopping waits for work in flight (the head's response timeout)."""
        ...

    async def start(self, *, accept: bool = True) -> None:
        """Listen; with `accept=False`, leave connections queued until accept_connections().
        BindError when an address cannot be used."""

    async def accept_connections(self) -> None: ...

    async def close(self, grace: float) -> None:
        """Stop accepting, let work in flight finish for up to `grace` seconds, cut the rest."""


class Head(Protocol):
    """One personality of `txco serve`."""

    @property
    def name(self) -> str:
        """Its personality name, its `ingress.<name>` section and its log prefix."""
        ...

    def build(self, engine: Engine) -> object:
        """This head's parts of a runtime; ConfigError for a bad `ingress.<name>` section."""
        ...

    def bind(self) -> object:
        """Bind the listeners in the parent of `--workers`, for every worker to serve
        (`server(..., inherited=...)`); BindError names an address that cannot be bound."""
        ...

    def release(self, bound: object) -> None:
        """Close what bind() bound (the parent's duty once every worker is gone)."""

    def server(self, holder: RuntimeHolder, inherited: object | None = None,
               slot: WorkerSlot | None = None) -> HeadServer:
        """Its server in this process, over `holder.current`; with `inherited` (what bind()
        returned in the parent) it serves those sockets, sharing them through `slot`."""
        ...
