"""Binding the --lmtp-listen-addrs sockets: TCP and Unix, for this process or for workers.

`bind_address` binds one address (a host name may give several sockets); `bind_listeners`
binds them all before worker processes are forked, for each to inherit. Unix socket files
are made group-writable, a stale one (left by a crash) is replaced, a live one is never
taken over. Accepting connections on the bound sockets is txcl.chassis.balance's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmtp.config import ListenAddress, Settings

# Connections the kernel queues for accept(), asyncio's own default.
LISTEN_BACKLOG = 100
SOCKET_MODE = 0o660


class ListenError(Exception):
    """A listen address that cannot be used. The message names it."""


@dataclass(frozen=True)
class BoundListener:
    """The sockets bound for one listen address (a host name may bind several)."""

    address: ListenAddress
    sockets: tuple[socket.socket, ...]

    def names(self) -> list[str]:
        """How the log shows what is bound: `host:port` per socket, or `unix:/path`."""
        if self.address.kind == "unix":
            return [str(self.address)]
        names = []
        for sock in self.sockets:
            host, port = sock.getsockname()[:2]
            names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return names


def bind_listeners(settings: Settings) -> list[BoundListener]:
    """Bind every --lmtp-listen-addrs entry now, without serving, for worker processes to
    inherit (`LMTPHead(..., inherited=...)`); ListenError names an address that cannot be
    bound, after closing what was."""
    return asyncio.run(_bind_all(settings))


async def _bind_all(settings: Settings) -> list[BoundListener]:
    bound: list[BoundListener] = []
    try:
        for address in settings.lmtp_listen_addrs:
            bound.append(await bind_address(address))
    except BaseException:
        close_listeners(bound)
        raise
    return bound


async def bind_address(address: ListenAddress) -> BoundListener:
    """Bind and listen on one address. Binding is asyncio's own (name resolution, dual
    stack, SO_REUSEADDR), so `:port` means what it means to asyncio's servers."""
    loop = asyncio.get_running_loop()
    try:
        if address.kind == "unix":
            _clear_stale_socket(Path(address.path))
            server = await loop.create_unix_server(
                asyncio.Protocol, address.path, start_serving=False)
            _open_to_group(Path(address.path))
        else:
            server = await loop.create_server(
                asyncio.Protocol, address.host, address.port, reuse_address=True,
                start_serving=False)
    except OSError as err:
        raise ListenError(f"cannot listen on {address}: {err.strerror or err}") from None
    # The server owns its sockets and closes them with itself: keep duplicates.
    socks = tuple(socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets)
    server.close()
    for sock in socks:
        sock.listen(LISTEN_BACKLOG)
    return BoundListener(address, socks)


def close_listeners(bound: Sequence[BoundListener]) -> None:
    """Close bound sockets and remove their socket files (the binding process's duty)."""
    for listener in bound:
        for sock in listener.sockets:
            sock.close()
        if listener.address.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                Path(listener.address.path).unlink()


def _open_to_group(path: Path) -> None:
    """Make the socket read-write for its owner and group, nobody else.

    Connecting needs write permission on the socket, which the process umask (typically
    022) would deny the group. With the socket itself open to the group, who may connect
    is decided by the parent folder, as the recipe sets it up (txco:postfix 0750, or a
    setgid folder of group postfix)."""
    os.chmod(path, SOCKET_MODE)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed server; refuse to take over a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as err:
        raise ListenError(f"cannot listen on unix:{path}: {err.strerror or err}") from None
    finally:
        probe.close()
    raise ListenError(f"cannot listen on unix:{path}: another server is listening there")
