"""op://WEBHOOK: POST the envelope as JSON to an http(s) URL, within the op's deadline.

Anything but a 2xx answer, a timeout or a connection error raises, so the run fails and
the recipients are tempfailed: the sender's mail waits in Postfix until the hook works.

This module also owns the deadline the network ops share: a socket timeout bounds each
wait, and a watchdog shuts the socket down when the whole budget is spent, so a peer that
trickles bytes cannot stretch a call past its deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from txcl.builtin_ops.emit import event_json

DEFAULT_TIMEOUT_S = 5.0
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m)?")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
SCHEMES = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}
USER_AGENT = "txcl-webhook/1"


class NetworkContext(Protocol):
    """The part of txcl.ops.OpContext the network ops rely on."""

    stack: str
    rid: str
    deadline_s: float | None


def duration_seconds(value: object, op: str) -> float:
    """`5`, `2.5`, `"5s"`, `"500ms"`, `"1m"` -> seconds; anything else is refused."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := DURATION.fullmatch(value.strip())):
        seconds = float(m.group(1)) * UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f'{op}: timeout must be a duration such as "5s" or "500ms", not {value!r}')
    if seconds <= 0:
        raise ValueError(f"{op}: timeout must be more than zero, not {value!r}")
    return seconds


def budget_seconds(args: Mapping[str, Any], ctx: NetworkContext, op: str) -> float:
    """The op's time budget: the tighter of WITH timeout and the context's deadline."""
    budgets = [duration_seconds(args["timeout"], op)] if "timeout" in args else []
    if ctx.deadline_s is not None:
        budgets.append(ctx.deadline_s)
    return max(min(budgets), 0.001) if budgets else DEFAULT_TIMEOUT_S


@contextlib.contextmanager
def socket_deadline(
    seconds: float, current_socket: Callable[[], socket.socket | None]
) -> Iterator[threading.Event]:
    """Shut the current socket down after `seconds`; the yielded event says it happened."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = current_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(seconds, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield expired
    finally:
        watchdog.cancel()


@dataclass(frozen=True, slots=True)
class Target:
    """A checked webhook URL; `shown` leaves the query out of messages (it may hold a token)."""

    scheme: str
    host: str
    port: int | None
    request_path: str
    shown: str


def url_argument(args: Mapping[str, Any]) -> Target:
    url = args.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError('WEBHOOK: WITH url = "https://..." is required')
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"WEBHOOK: url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"WEBHOOK: url {url!r} must use http or https")
    if not parts.hostname:
        raise ValueError(f"WEBHOOK: url {url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("WEBHOOK: credentials in the url are refused; put a token in its path")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ValueError(f"WEBHOOK: url {url!r} contains spaces or control characters")
    path = parts.path or "/"
    shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    request_path = f"{path}?{parts.query}" if parts.query else path
    return Target(parts.scheme, parts.hostname, port, request_path, shown)


def post(
    target: Target, body: bytes, headers: Mapping[str, str], seconds: float
) -> tuple[int, str]:
    """POST `body` and return (status, reason); raises TimeoutError or ConnectionError."""
    if target.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, timeout=seconds, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=seconds)
    with socket_deadline(seconds, lambda: conn.sock) as expired:
        try:
            conn.request("POST", target.request_path, body=body, headers=dict(headers))
            response = conn.getresponse()
            return response.status, response.reason
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set() or isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"WEBHOOK: POST {target.shown} timed out after {seconds:g}s"
                ) from None
            raise ConnectionError(f"WEBHOOK: POST {target.shown} failed: {exc}") from None
        finally:
            conn.close()


def webhook(envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: NetworkContext) -> dict:
    """op://WEBHOOK WITH url = "https://..." [include_raw, include_attachments, timeout]."""
    target = url_argument(args)
    seconds = budget_seconds(args, ctx, "WEBHOOK")
    body = event_json(envelope, args, "WEBHOOK")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Txcl-Rid": ctx.rid,
        "X-Txcl-Stack": ctx.stack,
    }
    status, reason = post(target, body, headers, seconds)
    if not 200 <= status < 300:
        raise ConnectionError(f"WEBHOOK: POST {target.shown} answered {status} {reason}")
    return {"webhook": {"status": status}}


OPS = {"WEBHOOK": webhook}
