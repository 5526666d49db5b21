"""txcl.chassis.balance: the session counters shared across fork, and the acceptor that steps aside
for a less busy worker (two acceptors on one listening socket, as two workers have)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from txcl.chassis import balance
from txcl.chassis.balance import BalancedAcceptor, SessionCounts, WorkerSlot


def test_a_count_a_forked_worker_writes_is_read_by_the_parent():
    counts = SessionCounts(3)
    pid = os.fork()
    if pid == 0:
        counts.set(2, 17)
        os._exit(0)
    os.waitpid(pid, 0)
    assert [counts.get(slot) for slot in range(3)] == [0, 0, 17]


@pytest.mark.parametrize(
    ("sessions", "slot", "steps_aside"),
    [
        ((0, 0), 0, False),  # a tie: both may take it
        ((3, 2), 0, True),
        ((2, 3), 0, False),
        ((5, 5, 4), 1, True),
        ((4, 5, 5), 0, False),
    ],
)
def test_only_a_worker_busier_than_some_peer_steps_aside(sessions, slot, steps_aside):
    counts = SessionCounts(len(sessions))
    for index, value in enumerate(sessions):
        counts.set(index, value)
    assert WorkerSlot(counts, slot).should_step_aside() is steps_aside


def _listening() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _connect_and_collect(
    listener: socket.socket, taken: list[str], count: int
) -> list[socket.socket]:
    port = listener.getsockname()[1]
    clients = []
    for _ in range(count):
        before = len(taken)
        clients.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(500):
            if len(taken) > before:
                break
            await asyncio.sleep(0.01)
    return clients


def _two_workers(counts: SessionCounts, listener: socket.socket, taken: list[str]):
    """Two acceptors on duplicates of one listening socket, as two forked workers hold it;
    each accepted connection is recorded under its acceptor's name and counted in its slot."""

    def accepted_by(name: str, slot: int):
        def connected(conn: socket.socket) -> None:
            taken.append(name)
            counts.set(slot, counts.get(slot) + 1)
            conn.close()

        return connected

    return [
        BalancedAcceptor(
            socket.socket(fileno=os.dup(listener.fileno())),
            accepted_by(name, slot),
            WorkerSlot(counts, slot),
        )
        for slot, name in enumerate(("a", "b"))
    ]


def test_the_less_busy_worker_takes_each_connection(monkeypatch):
    # A delay no scheduling hiccup reaches: the less busy acceptor always wins in time.
    monkeypatch.setattr(balance, "BALANCE_DELAY_S", 1.0)
    counts = SessionCounts(2)
    counts.set(0, 3)  # "a" already serves three sessions
    listener = _listening()
    taken: list[str] = []

    async def scenario() -> list[socket.socket]:
        acceptors = _two_workers(counts, listener, taken)
        for acceptor in acceptors:
            acceptor.start()
        try:
            return await _connect_and_collect(listener, taken, 7)
        finally:
            for acceptor in acceptors:
                acceptor.close()

    clients = asyncio.run(scenario())
    for client in clients:
        client.close()
    listener.close()
    # "b" catches up to three, then they alternate (a tie lets either take it).
    assert taken[:3] == ["b", "b", "b"]
    assert taken.count("a") >= 1 and taken.count("b") >= 4
    assert abs(counts.get(0) - counts.get(1)) <= 1


def test_a_busier_worker_takes_the_connection_when_no_peer_does(monkeypatch):
    monkeypatch.setattr(balance, "BALANCE_DELAY_S", 0.05)
    counts = SessionCounts(2)
    counts.set(0, 3)
    listener = _listening()
    taken: list[str] = []

    async def scenario() -> float:
        busy, idle_but_stuck = _two_workers(counts, listener, taken)
        busy.start()  # the other never accepts (a worker stuck in a long step)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            clients = await _connect_and_collect(listener, taken, 1)
        finally:
            busy.close()
            idle_but_stuck.close()
        for client in clients:
            client.close()
        return loop.time() - started

    waited = asyncio.run(scenario())
    listener.close()
    assert taken == ["a"]
    assert waited >= 0.05  # it stepped aside once first


def test_a_repeated_error_is_logged_once_per_interval_with_a_count(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(balance.time, "monotonic", lambda: now[0])
    repeated = balance.RepeatedLog(interval=10.0)
    with caplog.at_level("ERROR", logger="txco.lmtp"):
        for _ in range(1000):  # a burst: one line
            repeated.error("lmtp: cannot accept connections (%s)", "Too many open files")
        now[0] += 10.0
        repeated.error("lmtp: cannot accept connections (%s)", "Too many open files")
    assert [r.getMessage() for r in caplog.records] == [
        "lmtp: cannot accept connections (Too many open files)",
        "lmtp: cannot accept connections (Too many open files) (and 999 more times in the "
        "last 10s)",
    ]
