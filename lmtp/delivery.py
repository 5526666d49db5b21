"""One DATA -> one envelope per (tenant, stack) group -> stack runs -> one reply per RCPT.

The message is parsed once and its `msg` object is shared by every group's envelope (the
runner never mutates its input). Only the fields the routed stacks can observe are built
(`lmtp.message.MessageNeeds`, worked out once per compiled stack): a stack whose rules read
the subject and one header costs a header parse, not a MIME walk and a base64 copy. A
trace stores the message bytes themselves (handed over by reference, never base64) and
shows every header, so with traces on the headers are built too (`TRACED_FIELDS`), and
the address lists and body fields only when a stack reads them. Small
messages, header-only parses and the C passes that read a plain text message run on the
event loop (a thread hop costs more than they do); a big message's MIME walk runs in a
worker thread, so the loop keeps answering. Groups run concurrently; each resolves its own
verdicts, and the replies are stitched back into RCPT TO order.

`deliver` never raises: whatever goes wrong in a group becomes 451 4.3.0 for that group's
recipients, and is logged. The response deadline is the caller's (`lmtp.server` wraps
`deliver` in `--lmtp-resp-timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lmtp.message import (
    BODY_FIELDS,
    EVERYTHING,
    NOTHING,
    SOURCE,
    MessageNeeds,
    build_envelope,
    needs_of_path,
    needs_of_rules,
    parse_message,
    parse_mime,
    parse_plain_text,
)
from lmtp.mime import DEFAULT_LIMITS, MimeLimits, header_section_end
from lmtp.routing import Route
from lmtp.ulid import new_ulid
from lmtp.verdicts import DEFAULT_DENY, RUN_FAILED, Reply, replies_for, with_rid
from lmtp.wire import printable
from txcl.envelope import for_source
from txcl.logsafe import DEFAULT_REPEAT_INTERVAL_S, RepeatLimiter, escape_controls
from txcl.ops import make_delivery_key, message_digest
from txcl.trace import REDACTED, scrubber_for

if TYPE_CHECKING:
    from lmtp.config import Settings
    from txcl.ops import OpRegistry
    from txcl.records import StackResult
    from txcl.runner import RunPolicy

log = logging.getLogger("lmtp.delivery")

MAX_LOGGED_DEFECTS = 5
# MIME walks of messages up to this size (or parses of the header section alone, up to
# this size) run on the event loop: cheaper than the thread hop, and short enough not to
# stall it.
INLINE_PARSE_BYTES = 64 * 1024
INLINE_PARSE_PARTS = 32  # lines starting "--" (MIME boundaries) in a message parsed inline
# Messages up to this size get their C passes on the event loop: the plain text parse
# (`parse_plain_text`) and the digest. They take a fraction of a millisecond, less than
# the hop to a thread and back, and the parse's passes hold the GIL: in a thread they
# would keep the loop waiting just the same.
INLINE_PASSES_BYTES = 256 * 1024

class TraceSink(Protocol):
    """`sink(rid, envelope_in, result, replies, stack, error=..., message=...)`: result is a
    StackResult or None (the stack is not in the tree, or the run raised), replies are
    (recipient, line) pairs, stack is the `Stack` that ran or the routed stack's name, error
    what failed outside the run ("" if nothing), message the bytes of the message (the object
    itself, not a copy). Must be cheap; its failure is ignored (a `TraceWriter` is one)."""

    def __call__(
        self,
        rid: str,
        envelope_in: Mapping[str, Any],
        result: StackResult | None,
        replies: Sequence[tuple[str, str]],
        stack: Any = None,
        error: str = "",
        message: bytes | None = None,
    ) -> object: ...


class RunnableStack(Protocol):
    """What delivery needs of a compiled stack (a `txcl.runner.Stack`)."""

    async def run_async(
        self, envelope: Any, policy: RunPolicy = ..., *, message: bytes | None = None,
        delivery_key: str = "",
    ) -> StackResult: ...


class ServedTree(Protocol):
    """What delivery needs of a loaded tree (a `txcl.loader.Tree`)."""

    @property
    def stacks(self) -> Mapping[str, RunnableStack]: ...

    @property
    def rejected(self) -> Set[str]: ...


# What a trace shows of the message beyond what the stacks read: every header, decoded, and
# the fields its summary names. The address lists (a full header parse) and the bodies are
# in the message bytes, which are handed over as they are.
TRACED_FIELDS = MessageNeeds(frozenset({"id", "date", "subject", "headers"}))
MAIL_FROM_PATH = ("_txc", SOURCE, "mail", "from")  # where the envelope keeps the sender


@dataclass(frozen=True, slots=True)
class Transaction:
    """What the server hands over after DATA. `routes[i]` is the route of `rcpts[i]`."""

    listener: str
    client_ip: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    routes: tuple[Route | None, ...]
    data: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class Group:
    """The recipients of one transaction that share a (tenant, stack), in RCPT order."""

    route: Route  # the first recipient's route: its ingress goes into the envelope
    indices: tuple[int, ...]


def group_recipients(routes: Sequence[Route | None]) -> tuple[list[Group], list[int]]:
    """Groups in order of first appearance, and the indices of unrouted recipients."""
    if len(routes) == 1:  # the common case
        route = routes[0]
        return ([Group(route, (0,))], []) if route is not None else ([], [0])
    by_key: dict[tuple[str, str], tuple[Route, list[int]]] = {}
    unrouted: list[int] = []
    for index, route in enumerate(routes):
        if route is None:
            unrouted.append(index)
            continue
        by_key.setdefault((route.tenant, route.stack), (route, []))[1].append(index)
    return [Group(route, tuple(indices)) for route, indices in by_key.values()], unrouted


def default_policy(
    settings: Settings, registry: OpRegistry | None, explain: bool = False
) -> RunPolicy:
    from txcl.runner import RunPolicy  # the engine is imported when a server is built

    return RunPolicy(
        registry=registry,
        state_dir=getattr(settings, "state_dir", None),
        # No op may outlive the reply it is part of.
        op_timeout_max_s=getattr(settings, "lmtp_resp_timeout", None),
        op_calls_per_tenant=getattr(settings, "op_calls_per_tenant", None),
        explain=explain,
    )


class Deliverer:
    """Runs each DATA through the routed stacks of `tree` (a `txcl.loader.Tree`).

    `tree` may be replaced on a reload; each delivery reads it once.
    """

    def __init__(
        self,
        tree: ServedTree,
        settings: Settings,
        registry: OpRegistry | None = None,
        trace_sink: TraceSink | None = None,
        *,
        policy: RunPolicy | None = None,
    ) -> None:
        self.tree = tree
        self.settings = settings
        self.trace_sink = trace_sink
        self._traced = trace_sink is not None and getattr(trace_sink, "mode", None) != "off"
        # Traced runs keep their stage starts: the trace writer explains them.
        self.policy = (
            policy if policy is not None else default_policy(settings, registry, self._traced)
        )
        self._op_needs = op_needs(getattr(self.policy, "registry", registry))
        # What a trace sink stores of the message beyond what the stacks read (it may take
        # `raw` from the bytes); a sink that does not say gets the fields a trace shows.
        self._trace_needs: MessageNeeds = getattr(trace_sink, "message_needs", TRACED_FIELDS)
        self._mime_limits = MimeLimits(
            max_parts=getattr(settings, "lmtp_mime_max_parts", DEFAULT_LIMITS.max_parts),
            max_depth=getattr(settings, "lmtp_mime_max_depth", DEFAULT_LIMITS.max_depth),
            max_header_lines=getattr(settings, "lmtp_mime_max_header_lines",
                                     DEFAULT_LIMITS.max_header_lines))
        self._reply_rid: bool = getattr(settings, "lmtp_reply_rid", True)
        self._repeats = RepeatLimiter(
            getattr(settings, "log_repeat_interval", DEFAULT_REPEAT_INTERVAL_S)
        )
        # id(stack) -> (stack, its needs); the stack is kept so its id is not reused.
        self._needs: dict[int, tuple[Any, MessageNeeds]] = {}

    def needs_of(self, stack: Any) -> MessageNeeds:
        """The message fields `stack` can observe (everything for a stack we cannot read),
        and what the trace writer stores of them."""
        if self._traced and self._trace_needs.complete:
            return EVERYTHING
        cached = self._needs.get(id(stack))
        if cached is not None and cached[0] is stack:
            return cached[1]
        rules = getattr(stack, "rules", None)
        needs = EVERYTHING if rules is None else needs_of_rules(rules, self._op_needs)
        if self._traced:
            needs = needs | self._trace_needs
        self._needs[id(stack)] = (stack, needs)  # with the trace's needs: one lookup per run
        return needs

    async def deliver(self, tx: Transaction) -> list[str]:
        """One reply line per RCPT, in RCPT order. Never raises (cancellation aside)."""
        try:
            return await self._deliver(tx)
        except Exception as exc:
            self._log_failure(
                ("deliver", type(exc).__name__, str(exc)),
                "lmtp delivery failed before any stack ran; answering 451: %s",
                traceback.format_exc(),
            )
            return [RUN_FAILED.line] * len(tx.rcpts)

    async def _deliver(self, tx: Transaction) -> list[str]:
        replies: list[Reply] = [RUN_FAILED] * len(tx.rcpts)
        groups, unrouted = group_recipients(_aligned_routes(tx))
        for index in unrouted:
            replies[index] = DEFAULT_DENY
        if groups:
            tree = self.tree
            stacks = getattr(tree, "stacks", None) or {}
            # A large message's trace file is written while the stacks run (TraceWriter.stage).
            stage = getattr(self.trace_sink, "stage", None) if self._traced else None
            traced = (stage(tx.data) if stage else None) or tx.data
            needs: MessageNeeds | None = None
            for group in groups:
                stack = stacks.get(group.route.stack)
                if stack is not None:  # needs_of(stack) holds the trace's needs already
                    stack_needs = self.needs_of(stack)
                    needs = stack_needs if needs is None else needs | stack_needs
            if needs is None:  # no group's stack is served
                needs = self._trace_needs if self._traced else NOTHING
            # after the lookups: a lazily compiled stack is known to be rejected once looked up
            rejected = frozenset(getattr(tree, "rejected", None) or ())
            # Ops key their side effects on the delivery, so a retry does not repeat them.
            uses_ops = any(getattr(stacks.get(g.route.stack), "ops_used", ()) for g in groups)
            msg, defects, digest = await _parse(tx.data, needs, self._mime_limits, uses_ops)
            if defects:
                log.info(
                    "lmtp message defects (%d): %s", len(defects),
                    defect_kinds(defects[:MAX_LOGGED_DEFECTS]),
                )
            if len(groups) == 1:  # the common case: no tasks to gather
                results = [
                    await self._run_group(tx, groups[0], msg, stacks, rejected, digest, traced)
                ]
            else:
                results = await asyncio.gather(
                    *(
                        self._run_group(tx, group, msg, stacks, rejected, digest, traced)
                        for group in groups
                    )
                )
            for group, group_replies in zip(groups, results, strict=True):
                for index, reply in zip(group.indices, group_replies, strict=True):
                    replies[index] = reply
            if written := getattr(traced, "written", None):  # staged: the bytes can go
                await written()
        return [reply.line for reply in replies]

    def _transaction_rcpt(self, tx: Transaction, tenant: str) -> Sequence[str]:
        """Every recipient of the transaction, or with `--lmtp-transaction-rcpt=tenant` only
        those routed to `tenant`: a tenant's rules need not see who else got the mail."""
        if getattr(self.settings, "lmtp_transaction_rcpt", "all") != "tenant":
            return tx.rcpts
        return [rcpt for rcpt, route in zip(tx.rcpts, _aligned_routes(tx), strict=True)
                if route is not None and route.tenant == tenant]

    async def _run_group(
        self,
        tx: Transaction,
        group: Group,
        msg: Mapping[str, Any],
        stacks: Mapping[str, Any],
        rejected: frozenset[str],
        digest: bytes,  # the message's, when a stack uses ops
        traced: Any,  # what the trace sink gets as the message: the bytes or their stage
    ) -> list[Reply]:
        started = time.monotonic()
        route = group.route
        rid = new_ulid()
        rcpts = [tx.rcpts[i] for i in group.indices]
        envelope: dict[str, Any] = {}
        stack = stacks.get(route.stack)
        result: Any = None
        failure = ""
        try:
            envelope = build_envelope(
                rid=rid,
                route=route,
                listener=tx.listener,
                client_ip=tx.client_ip,
                helo=tx.helo,
                mail_from=tx.mail_from,
                size=len(tx.data),
                rcpt=rcpts,
                transaction_rcpt=self._transaction_rcpt(tx, route.tenant),
                msg=msg,
            )
            if stack is None and route.stack in rejected:
                # The tenant wrote this stack but it failed to load: keep the mail queued
                # (Postfix retries) rather than bounce it over a typo being fixed.
                replies = [RUN_FAILED] * len(rcpts)
                failure = "stack not served: it failed to load"
            elif stack is None:
                # A routed stack the tree does not have: no rule can accept (default-deny).
                replies = [DEFAULT_DENY] * len(rcpts)
            else:
                key = make_delivery_key(digest, tx.mail_from, rcpts, route.stack) if digest else ""
                result = await stack.run_async(
                    envelope, self.policy, message=tx.data, delivery_key=key
                )
                replies = replies_for(result.envelope, len(rcpts), result.error)
        except Exception as exc:
            self._log_failure(
                ("run", route.stack, type(exc).__name__, str(exc)),
                "lmtp rid=%s stack=%s: run raised; answering 451: %s",
                rid, route.stack, traceback.format_exc(),
            )
            replies = [RUN_FAILED] * len(rcpts)
            failure = f"{type(exc).__name__} during the run"
        if self._reply_rid:
            replies = [with_rid(reply, rid) for reply in replies]
        note, sender = _scrubbed(_outcome_note(stack, result, failure), tx.mail_from, stack,
                                 envelope, result)
        let_through, held = self._repeats.allow((route.stack, note)) if note else (True, 0)
        if let_through:
            log.info(
                "lmtp group rid=%s stack=%s ingress=%s from=<%s> rcpts=%d codes=%s%s %.0fms%s",
                rid, route.stack, route.ingress, printable(sender, 256), len(rcpts),
                ",".join(str(r.code) for r in replies),
                escape_controls(note),
                (time.monotonic() - started) * 1000,
                f" ({held} more like it held back)" if held else "",
            )
        self._trace(
            rid, envelope, result, rcpts, replies, stack or route.stack, failure, traced
        )
        return replies

    def _trace(
        self, rid: str, envelope: Mapping[str, Any], result: Any, rcpts: Sequence[str],
        replies: Sequence[Reply], stack: Any, failure: str, data: Any,
    ) -> None:
        if self.trace_sink is None:
            return
        pairs = [(rcpt, reply.line) for rcpt, reply in zip(rcpts, replies, strict=True)]
        try:
            self.trace_sink(rid, envelope, result, pairs, stack, error=failure, message=data)
        except Exception as exc:
            self._log_failure(
                ("trace", type(exc).__name__, str(exc)),
                "lmtp rid=%s: trace sink failed (replies unaffected): %s",
                rid, traceback.format_exc(),
            )

    def _log_failure(self, key: tuple[str, ...], message: str, *args: Any) -> None:
        """An error line, its data escaped (a traceback becomes one line), and held back
        when the same failure was logged within --log-repeat-interval."""
        let_through, held = self._repeats.allow(key)
        if let_through:
            suffix = f" ({held} more like it held back)" if held else ""
            log.error(message + "%s", *map(escape_controls, args), suffix)


async def _parse(data: bytes, needs: MessageNeeds, limits: MimeLimits, digest: bool = False
                 ) -> tuple[dict[str, Any], list[str], bytes]:
    """The message object and its defects, and with `digest` the message's digest (else b"").

    Only a MIME walk (pure Python) gains from a thread: the GIL switches every few ms, so
    the loop keeps answering meanwhile. A C pass holds the GIL throughout (base64 for `raw`,
    the plain text parse's decoding), so a thread would add a hop and block the loop just
    the same; what does go to a thread (a big walk, or anything about a big message) takes
    the digest along, one hop for both.
    """
    small = len(data) <= INLINE_PASSES_BYTES
    parse: Callable[..., tuple[dict[str, Any], list[str]]] = parse_message
    if not (needs.complete or needs.fields & BODY_FIELDS):
        inline = header_section_end(data) <= INLINE_PARSE_BYTES and (small or not digest)
    elif small:
        plain = parse_plain_text(data, needs, limits)
        if plain is not None:
            return (*plain, message_digest(data) if digest else b"")
        parse = parse_mime
        # a short message of many tiny parts is a long walk: not on the loop
        inline = len(data) <= INLINE_PARSE_BYTES and data.count(b"\n--") <= INLINE_PARSE_PARTS
    else:
        inline = False
    if inline:
        return (*parse(data, needs, limits=limits), message_digest(data) if digest else b"")
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(_parse_and_digest, parse, data, needs, limits, digest,
                                       cancel)
    except asyncio.CancelledError:
        cancel.set()  # the delivery was answered (or the server stops): free the thread
        raise


def _parse_and_digest(
    parse: Callable[..., tuple[dict[str, Any], list[str]]], data: bytes, needs: MessageNeeds,
    limits: MimeLimits, digest: bool, cancel: threading.Event,
) -> tuple[dict[str, Any], list[str], bytes]:
    msg, defects = parse(data, needs, limits=limits, cancel=cancel)
    return msg, defects, message_digest(data) if digest else b""


def op_needs(registry: OpRegistry | None) -> dict[str, MessageNeeds]:
    """What each op of `registry` (None: the default one) that declares what it reads can
    observe of the message; ops that may read anything are left out (they need everything).
    The raw message an op reads is not built for it: every run gets the bytes
    (`Stack.run_async(..., message=)`)."""
    from txcl.errors import TxclError
    from txcl.ops import OpRegistry  # the engine is imported when a server is built

    if registry is None:
        try:
            registry = OpRegistry.default()
        except TxclError:  # the runs report it; here every op then needs everything
            return {}
    out = {}
    for name in registry.names():
        entry = registry.entry(name)
        if entry is None or entry.reads.paths is None:
            continue
        needs = NOTHING
        for path in entry.reads.paths:
            needs = needs | needs_of_path(for_source(path, SOURCE))
        out[name] = needs
    return out


def _scrubbed(note: str, sender: str, stack: Any, envelope: Mapping[str, Any], result: Any
              ) -> tuple[str, str]:
    """The note and the sender (`MAIL FROM`) of a group's log line, scrubbed by the stack's
    `WITH omit` / `WITH redact` with the trace's own scrubber: the sender as the trace's
    envelope shows it, the note (an error quoting values) as the trace scrubs loose text.
    A log line is no place for what a trace may not keep."""
    hints = getattr(stack, "hints", None)
    if not hints:
        return note, sender
    scrubber = scrubber_for(hints)
    clean_sender = scrubber.at(MAIL_FROM_PATH, sender)
    if note:  # the taint walks the envelope: only for the rare line that quotes values
        clean = scrubber.taint(envelope, getattr(result, "envelope", None)).clean(note)
        note = clean if isinstance(clean, str) else f" {REDACTED}"
    return note, clean_sender if isinstance(clean_sender, str) else REDACTED


def _outcome_note(stack: Any, result: Any, failure: str) -> str:
    if failure:
        return f" error={failure}"
    if stack is None:
        return " (stack not in tree: default-deny)"
    error = getattr(result, "error", None)
    if error is not None:
        return f" error={getattr(error, 'code', '')}: {getattr(error, 'message', error)}"
    return ""


def defect_kinds(defects: Sequence[str]) -> str:
    """The defects as a log shows them: where and what kind only (`headers: ValueError`),
    since a parser's message may quote a header value and no stack's WITH redact is known
    for the line that logs them."""
    return escape_controls("; ".join(": ".join(d.split(": ", 2)[:2]) for d in defects))


def _aligned_routes(tx: Transaction) -> tuple[Route | None, ...]:
    """The routes, one per RCPT; a missing route counts as unrouted, never as accepted."""
    routes = tuple(tx.routes[: len(tx.rcpts)])
    return routes + (None,) * (len(tx.rcpts) - len(routes))
