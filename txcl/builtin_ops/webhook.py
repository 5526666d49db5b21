"""op://WEBHOOK: POST the envelope as JSON to an http(s) URL, within the op's deadline.

Anything but a 2xx answer, a timeout or a connection error raises, so the run fails and
the recipients are tempfailed: the sender's mail waits in Postfix until the hook works.
The call is bounded by `support.socket_deadline`, as FORWARD's is.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from txcl.builtin_ops.once import once, once_key
from txcl.builtin_ops.support import event_json, socket_deadline
from txcl.ops import ANYTHING, OpContext, OpFailure, RegisteredOp

SCHEMES = frozenset({"http", "https"})
USER_AGENT = "txcl-webhook/1"


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
        raise OpFailure('WEBHOOK: WITH url = "https://..." is required')
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OpFailure(f"WEBHOOK: url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise OpFailure(f"WEBHOOK: url {url!r} must use http or https")
    if not parts.hostname:
        raise OpFailure(f"WEBHOOK: url {url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise OpFailure("WEBHOOK: credentials in the url are refused; put a token in its path")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise OpFailure(f"WEBHOOK: url {url!r} contains spaces or control characters")
    path = parts.path or "/"
    shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    request_path = f"{path}?{parts.query}" if parts.query else path
    return Target(parts.scheme, parts.hostname, port, request_path, shown)


def post(
    target: Target, body: bytes, headers: Mapping[str, str], seconds: float
) -> tuple[int, str]:
    """POST `body` and return (status, reason); raises OpFailure on a timeout or a network error."""
    if target.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, timeout=seconds, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=seconds)
    with socket_deadline(seconds, lambda: conn.sock) as deadline:
        try:
            conn.request("POST", target.request_path, body=body, headers=dict(headers))
            response = conn.getresponse()
            if deadline.passed():  # e.g. headers cut short by the watchdog
                raise TimeoutError
            return response.status, response.reason
        except (OSError, http.client.HTTPException) as exc:
            if deadline.passed() or isinstance(exc, TimeoutError):
                raise OpFailure(
                    f"WEBHOOK: POST {target.shown} timed out after {seconds:g}s"
                ) from None
            raise OpFailure(f"WEBHOOK: POST {target.shown} failed: {exc}") from None
        finally:
            conn.close()


def webhook(
    envelope: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext, key: str | None = None
) -> dict:
    """op://WEBHOOK WITH url = "https://..." [WITH include_raw / include_attachments = true];
    `key` the call's `once_key` when `once` has it already."""
    target = url_argument(args)
    seconds = ctx.deadline_s
    body = event_json(envelope, args, "WEBHOOK")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Txcl-Rid": ctx.rid,
        "X-Txcl-Stack": ctx.stack,
    }
    if key is None:
        key = once_key(ctx, "WEBHOOK", args)
    if key:  # the same for every retry of this delivery: the receiver can drop repeats
        headers["Idempotency-Key"] = key
    status, reason = post(target, body, headers, seconds)
    if not 200 <= status < 300:
        raise OpFailure(f"WEBHOOK: POST {target.shown} answered {status} {reason}")
    return {"webhook": {"status": status}}


OP = RegisteredOp.builtin("WEBHOOK", once("WEBHOOK", webhook, keyed=True), ANYTHING)  # the whole envelope
