"""How `--workers N` share the connections: the least busy worker accepts the next one.

Every worker waits on the same listening sockets and the kernel wakes them all for a new
connection; whoever calls accept() first gets it. Left alone, that is whoever happened to
be idle at that instant: a burst of connections (Postfix opening its LMTP sessions) splits
unevenly, and because Postfix keeps its sessions open and reuses them, the split lasts:
one worker serves most of the mail while another core idles (the figures are in the
commit that added this module and in docs/lmtp.md).

So each worker publishes how many sessions it has open, in a table of counters the parent
shares with every worker (an anonymous shared mapping made before forking, one slot per
worker, written only by its owner). A worker that holds more sessions than the least busy
of its peers steps aside for BALANCE_DELAY_S when a connection arrives, which lets that
peer take it; if it is still waiting afterwards (the peer is stuck in a long step), the
worker takes it after all, so no connection waits longer than that.

`BalancedAcceptor` is the accept loop of every listener, with or without peers: at the
descriptor limit it backs off instead of spinning, and logs the error once per interval.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import socket
import struct
import time
from collections.abc import Callable

log = logging.getLogger("txco.balance")

# How long a busier worker leaves a new connection to a less busy one. Long enough for a
# worker woken by the same connection to reach accept(), short next to any delivery.
BALANCE_DELAY_S = 0.002
# The pause after accept() fails for lack of file descriptors or memory: doubled from the
# first to the last while it keeps failing, so the loop neither spins nor stays away long.
ACCEPT_RETRY_FIRST_S = 0.05
ACCEPT_RETRY_LAST_S = 1.0
# An error that repeats is logged at most once per this interval, with how often it came.
REPEAT_LOG_INTERVAL_S = 10.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_SLOT = struct.Struct("=q")


class SessionCounts:
    """Open sessions per worker, in memory shared by the parent and every forked worker."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._memory = mmap.mmap(-1, _SLOT.size * workers)  # MAP_SHARED | MAP_ANONYMOUS

    def get(self, slot: int) -> int:
        return _SLOT.unpack_from(self._memory, slot * _SLOT.size)[0]

    def set(self, slot: int, sessions: int) -> None:
        _SLOT.pack_into(self._memory, slot * _SLOT.size, sessions)

    def busier_than_a_peer(self, slot: int) -> bool:
        """Whether the worker in `slot` has more sessions open than some other worker."""
        mine = self.get(slot)
        return any(self.get(other) < mine for other in range(self.workers) if other != slot)


class WorkerSlot:
    """One worker's view of the SessionCounts: it writes its own count, reads the rest."""

    def __init__(self, counts: SessionCounts, slot: int) -> None:
        self.counts = counts
        self.slot = slot

    def publish(self, sessions: int) -> None:
        self.counts.set(self.slot, sessions)

    def should_step_aside(self) -> bool:
        return self.counts.busier_than_a_peer(self.slot)


class RepeatedLog:
    """Logs one kind of error at most once per `interval`; the times it came in between are
    counted and reported with the next line, so a fault that repeats cannot flood the log."""

    def __init__(self, interval: float = REPEAT_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last = -interval
        self._unreported = 0

    def error(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._unreported += 1
            return
        if self._unreported:
            message += f" (and {self._unreported} more times in the last %gs)"
            args = (*args, round(now - self._last))
        self._last = now
        self._unreported = 0
        log.error(message, *args)


class BalancedAcceptor:
    """Accepts the connections of one shared listening socket for this worker, one per
    readiness event, stepping aside first when this worker is the busier one."""

    def __init__(
        self,
        sock: socket.socket,
        connected: Callable[[socket.socket], object],
        slot: WorkerSlot | None,
    ) -> None:
        self.sock = sock
        self.connected = connected  # called with each accepted, non-blocking socket
        self.slot = slot  # None: a worker without peers to balance with
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._retry_delay = ACCEPT_RETRY_FIRST_S
        self._accept_errors = RepeatedLog()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._acceptable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _pause(self, seconds: float) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        if self._closed:
            return
        assert self._loop is not None
        self._loop.add_reader(self.sock.fileno(), self._acceptable)
        self._accept()  # a connection still waiting after this worker stepped aside

    def _acceptable(self) -> None:
        if self.slot is not None and self.slot.should_step_aside():
            self._pause(BALANCE_DELAY_S)
        else:
            self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as err:
            if err.errno not in _RESOURCE_ERRORS:
                raise
            self._accept_errors.error("lmtp: cannot accept connections (%s); trying again",
                                      err.strerror)
            self._pause(self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, ACCEPT_RETRY_LAST_S)
            return
        self._retry_delay = ACCEPT_RETRY_FIRST_S
        conn.setblocking(False)
        self.connected(conn)
