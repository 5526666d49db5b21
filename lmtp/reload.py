"""The LMTP head over the chassis's live runtime (txcl.chassis.reload): each transaction
is routed and delivered by the one runtime it took at its first RCPT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmtp.config import HEAD, LISTENER_NAME, IngressConfig
from lmtp.delivery import Deliverer
from lmtp.routing import Router
from lmtp.session import Envelope, Session, accept_recipient, deliver_envelope
from txcl.chassis.reload import RuntimeHolder
from txcl.chassis.runtime import Runtime, compile_if_pending


@dataclass(frozen=True)
class LmtpParts:
    """The LMTP head's part of one runtime (built by lmtp.personality)."""

    ingress: IngressConfig
    router: Router
    deliverer: Deliverer


@dataclass(frozen=True)
class ReloadingHandler:
    """The server's RCPT and DATA hooks over whatever runtime is current.

    A transaction takes `holder.current` once, at its first RCPT TO, and keeps it on its
    envelope: every RCPT of the transaction is routed, and its DATA delivered, by that one
    version, however many reloads happen meanwhile. RSET or the end of DATA starts a new
    envelope, so the next transaction takes the version current then.
    """

    holder: RuntimeHolder
    make_transaction: Callable[..., Any]
    listener: str = LISTENER_NAME

    def runtime_of(self, envelope: Envelope) -> Runtime:
        runtime: Runtime | None = getattr(envelope, "runtime", None)
        if runtime is None:
            runtime = self.holder.current
            envelope.runtime = runtime
        return runtime

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        runtime = self.runtime_of(envelope)
        parts: LmtpParts = runtime.heads[HEAD]
        routed = len(envelope.routes)
        reply = accept_recipient(parts.router, self.listener, envelope, address)
        if len(envelope.routes) > routed:  # a lazy start: the stack as its files are now
            await compile_if_pending(runtime.tree, envelope.routes[-1].stack)
        return reply

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> list[str]:
        deliverer = self.runtime_of(envelope).heads[HEAD].deliverer
        return await deliver_envelope(
            deliverer, self.make_transaction, self.listener, session, envelope
        )

