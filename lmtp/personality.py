"""The LMTP head as the chassis sees it (txcl.chassis.head.Head): its parts of each runtime
(the `ingress.lmtp` section, the router, the deliverer), its listeners and its server."""

from __future__ import annotations

from lmtp.config import HEAD, IngressConfig, Settings, ingress_config
from lmtp.delivery import Deliverer, Transaction
from lmtp.hostnames import HostnameStore
from lmtp.reload import LmtpParts, ReloadingHandler
from lmtp.routing import Router
from lmtp.server import BoundListener, ListenError, LMTPHead, bind_listeners, close_listeners
from txcl.chassis.balance import WorkerSlot
from txcl.chassis.head import BindError, Engine
from txcl.chassis.reload import RuntimeHolder


class LmtpPersonality:
    """`--personalities=lmtp`: mail from Postfix over LMTP."""

    name = HEAD

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._hostnames: HostnameStore | None = None
        self._routing: tuple[object, IngressConfig, Router] | None = None  # of the last config

    def build(self, engine: Engine) -> LmtpParts:
        if self._hostnames is None:  # opened in the serving process, not before a fork
            self._hostnames = HostnameStore(self.settings.state_dir)
        if self._routing is not None and self._routing[0] is engine.config:  # a rules reload
            ingress, router = self._routing[1:]
        else:
            ingress = ingress_config(engine.config)
            router = Router(ingress, self.settings, self._hostnames)
            self._routing = (engine.config, ingress, router)
        return LmtpParts(
            ingress=ingress,
            router=router,
            deliverer=Deliverer(engine.tree, self.settings, registry=engine.registry,
                                trace_sink=engine.trace_sink),
        )

    def bind(self) -> list[BoundListener]:
        try:
            return bind_listeners(self.settings)
        except ListenError as err:
            raise BindError(str(err)) from None

    def release(self, bound: object) -> None:
        close_listeners(_listeners(bound))

    def server(self, holder: RuntimeHolder, inherited: object | None = None,
               slot: WorkerSlot | None = None) -> LmtpServer:
        handler = ReloadingHandler(holder, Transaction)
        inherited_listeners = None if inherited is None else _listeners(inherited)
        return LmtpServer(LMTPHead(self.settings, handler, inherited_listeners, slot),
                          self.settings.lmtp_resp_timeout)


class LmtpServer:
    """txcl.chassis.head.HeadServer over lmtp.server.LMTPHead."""

    def __init__(self, head: LMTPHead, grace_s: float) -> None:
        self.head = head
        self.grace_s = grace_s

    @property
    def bound(self) -> list[str]:
        return self.head.bound

    async def start(self, *, accept: bool = True) -> None:
        try:
            await self.head.start(accept=accept)
        except ListenError as err:
            raise BindError(str(err)) from None

    async def accept_connections(self) -> None:
        await self.head.accept_connections()

    async def close(self, grace: float) -> None:
        await self.head.close(grace)


def _listeners(bound: object) -> list[BoundListener]:
    assert isinstance(bound, list), "what LmtpPersonality.bind() returned"
    return bound
