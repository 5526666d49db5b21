"""The LMTP head of one `txco serve`: its listeners, its sessions, and a graceful shutdown.

`LMTPHead` binds every --lmtp-listen-addrs entry (lmtp.listeners), accepts connections
(txcl.chassis.balance) and runs one `LMTPSession` (lmtp.session) per connection. With several
worker processes (`txco serve --workers N`) the parent binds once (`bind_listeners`) and
each worker serves the inherited sockets: the kernel hands every connection to one worker,
and the least busy worker takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Sequence

from lmtp.config import Settings
from lmtp.listeners import BoundListener, ListenError, bind_address, bind_listeners, close_listeners
from lmtp.session import DeliveryHandler, Handler, LMTPSession, client_ip
from txcl.chassis.balance import BalancedAcceptor, RepeatedLog, WorkerSlot

__all__ = ["BoundListener", "DeliveryHandler", "LMTPHead", "ListenError", "bind_listeners",
           "close_listeners"]

log = logging.getLogger("txco.lmtp")


class LMTPHead:
    """Every LMTP listener of one `txco serve`, and its graceful shutdown.

    With `inherited` (sockets a parent bound) the head serves those instead of binding, and
    leaves socket files to the parent; with a `slot` too, it shares their connections with
    the parent's other workers (txcl.chassis.balance)."""

    def __init__(self, settings: Settings, handler: Handler | None,
                 inherited: Sequence[BoundListener] | None = None,
                 slot: WorkerSlot | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.inherited = inherited
        self.slot = slot
        self.sessions: set[LMTPSession] = set()
        self.all_closed = asyncio.Event()
        self.bound: list[str] = []
        self._owned: list[BoundListener] = []  # bound here: closed and unlinked here
        self._acceptors: list[BalancedAcceptor] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._per_address: Counter[str] = Counter()  # TCP clients' sessions by address
        self._refusals = RepeatedLog()

    # --- the sessions (lmtp.session.SessionRegistry) -------------------------------------

    def opened(self, session: LMTPSession) -> None:
        self.sessions.add(session)  # published when its setup ends (_connect)

    def closed(self, session: LMTPSession) -> None:
        self._forget_address(client_ip(session.session.peer))
        self.sessions.discard(session)
        self.sessions_changed()
        if not self.sessions:
            self.all_closed.set()

    def sessions_changed(self) -> None:
        """Publish this worker's load (sessions open or being set up) to its peers."""
        if self.slot is not None:
            self.slot.publish(len(self.sessions) + len(self._connecting))

    # --- listening -------------------------------------------------------------------------

    async def start(self, *, accept: bool = True) -> None:
        """Bind every address; on any failure close what was bound and raise ListenError.

        With inherited sockets and `accept=False`, connections wait in the kernel's queue
        until `accept_connections()`: workers that start at different speeds begin to
        accept together, so the first one ready does not take every early connection."""
        try:
            if self.inherited is not None:
                for listener in self.inherited:
                    self._serve(listener, accept, inherited=True)
                return
            for address in self.settings.lmtp_listen_addrs:
                listener = await bind_address(address)
                self._owned.append(listener)
                self._serve(listener, accept, inherited=False)
        except BaseException:
            await self.close(grace=0)
            raise

    async def accept_connections(self) -> None:
        """Start accepting on every listener `start(accept=False)` left waiting."""
        for acceptor in self._acceptors:
            acceptor.start()

    def _serve(self, listener: BoundListener, accept: bool, *, inherited: bool) -> None:
        for bound in listener.sockets:
            # An inherited socket stays the parent's: this worker accepts on its own copy.
            sock = (socket.socket(bound.family, bound.type, fileno=os.dup(bound.fileno()))
                    if inherited else bound)
            acceptor = BalancedAcceptor(sock, self._accepted, self.slot)
            self._acceptors.append(acceptor)
            if accept:
                acceptor.start()
        self.bound.extend(listener.names())

    def _accepted(self, conn: socket.socket) -> None:
        address = _peer_address(conn)
        refusal = self._over_a_limit(address)
        if refusal is not None:
            self._refusals.error("lmtp: refused a connection from %s: %s", address, refusal)
            with contextlib.suppress(OSError):
                conn.send(f"421 4.7.0 {self.settings.lmtp_hostname} {refusal}, "
                          f"try again later\r\n".encode())
            conn.close()
            return
        if address != "unix":
            self._per_address[address] += 1
        task = asyncio.get_running_loop().create_task(self._connect(conn, address))
        self._connecting.add(task)
        self.sessions_changed()

    def _over_a_limit(self, address: str) -> str | None:
        """Why a new connection from `address` is refused (--lmtp-max-connections and
        --lmtp-max-connections-per-ip), or None. Unix-socket clients have no address: only
        the total counts for them."""
        settings = self.settings
        if len(self.sessions) + len(self._connecting) >= settings.lmtp_max_connections:
            return "too many connections"
        if address != "unix" and \
                self._per_address[address] >= settings.lmtp_max_connections_per_ip:
            return "too many connections from your address"
        return None

    def _forget_address(self, address: str) -> None:
        if address != "unix":
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    async def _connect(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        handler = self.handler
        assert handler is not None, "a head that accepts connections needs a handler"
        try:
            await loop.connect_accepted_socket(
                lambda: LMTPSession(self.settings, handler, self), conn)
        except OSError as err:  # the client left before the transport was set up
            log.info("lmtp: connection lost while being set up: %s", err)
            conn.close()
            self._forget_address(address)
        finally:
            self._connecting.discard(asyncio.current_task())
            self.sessions_changed()

    async def close(self, grace: float) -> None:
        """Stop accepting, let sessions finish their current transaction for up to `grace`
        seconds (idle ones get 421 at once), then cut the rest and remove socket files."""
        for acceptor in self._acceptors:
            acceptor.close()
        for session in list(self.sessions):
            session.close_for_shutdown()
        if self.sessions:
            self.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), grace)
        for session in list(self.sessions):
            session.abort()
        close_listeners(self._owned)
        self._owned.clear()
        self._acceptors.clear()


def _peer_address(conn: socket.socket) -> str:
    """The client's IP address; "unix" for a Unix-socket client (or one already gone)."""
    try:
        return client_ip(conn.getpeername())
    except OSError:
        return "unix"
