"""lmtp.delivery: grouping, one envelope per group, concurrent runs, replies in RCPT order."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lmtp.delivery import Deliverer, Transaction, group_recipients
from lmtp.routing import Route
from tests.conftest import RID_SUFFIX, rid_of
from txcl.errors import Problem

DENY = "550 5.1.1 no rule accepted this recipient"
TEMPFAIL = "451 4.3.0 temporary failure processing the message, try again later"

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: alice@acme.example, bob@beta.example\r\n"
    b"Subject: wifi keeps dropping\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Hi support\r\n"
)


def route(tenant: str, stack: str, ingress: str) -> Route:
    return Route(tenant, f"{tenant}/{stack}", ingress, f"{tenant}/{stack}/0")


ACME = route("acme", "_mail", "domain:acme.example")
BETA = route("beta", "_mail", "domain:beta.example")


def transaction(*pairs: tuple[str, Route | None], data: bytes = MESSAGE) -> Transaction:
    return Transaction(
        listener="default",
        client_ip="10.0.0.7",
        helo="mail.postfix.example",
        mail_from="alice@example.com",
        rcpts=tuple(a for a, _ in pairs),
        routes=tuple(r for _, r in pairs),
        data=data,
        received_at=0.0,
    )


@dataclass
class Result:
    envelope: dict
    error: Problem | None = None


@dataclass
class FakeStack:
    """Stands in for txcl's Stack: writes `res` computed from the envelope, like a rule."""

    name: str
    decide: Callable[[dict], dict]
    seen: list[dict] = field(default_factory=list)
    messages: list[bytes | None] = field(default_factory=list)

    async def run_async(
        self, envelope: dict, policy: Any, *, message: bytes | None = None, delivery_key: str = ""
    ) -> Result:
        self.seen.append(envelope)
        self.messages.append(message)
        await asyncio.sleep(0)
        out = dict(envelope)
        out["_txc"] = {**envelope["_txc"]}
        out["_txc"]["lmtp"] = {**envelope["_txc"]["lmtp"], "res": self.decide(envelope)}
        return Result(out)


@dataclass
class Tree:
    stacks: dict[str, Any]


def accept_support(envelope: dict) -> dict:
    rcpts = envelope["_txc"]["lmtp"]["rcpt"]
    return {"recipients": [{"code": 250, "msg": "queued"} if "support" in r else None for r in rcpts]}


def deliver(deliverer: Deliverer, tx: Transaction) -> list[str]:
    """The reply lines, each without the request id a group's reply ends with (the tests
    of the id itself read `deliver_raw`)."""
    return [RID_SUFFIX.sub("", line) for line in deliver_raw(deliverer, tx)]


def deliver_raw(deliverer: Deliverer, tx: Transaction) -> list[str]:
    return asyncio.run(deliverer.deliver(tx))


def test_transaction_rcpt_can_show_a_tenant_only_its_own_recipients():
    from lmtp.config import Settings

    acme = FakeStack("acme/_mail", accept_support)
    beta = FakeStack("beta/_mail", lambda env: {"code": 250})
    tree = Tree({"acme/_mail": acme, "beta/_mail": beta})
    tx = transaction(
        ("support@acme.example", ACME), ("bob@beta.example", BETA), ("carol@acme.example", ACME)
    )
    own = Settings(lmtp_transaction_rcpt="tenant", lmtp_hostname="test")
    assert deliver(Deliverer(tree, own, policy=object()), tx)[1] == "250 2.0.0 OK"
    assert acme.seen[-1]["_txc"]["lmtp"]["transaction_rcpt"] == [
        "support@acme.example", "carol@acme.example"]
    assert beta.seen[-1]["_txc"]["lmtp"]["transaction_rcpt"] == ["bob@beta.example"]
    everyone = Settings(lmtp_hostname="test")  # the default: who else got the mail
    deliver(Deliverer(tree, everyone, policy=object()), tx)
    assert beta.seen[-1]["_txc"]["lmtp"]["transaction_rcpt"] == [
        "support@acme.example", "bob@beta.example", "carol@acme.example"]


def test_fan_out_across_two_tenants_stitches_replies_in_rcpt_order():
    acme = FakeStack("acme/_mail", accept_support)
    beta = FakeStack("beta/_mail", lambda env: {"code": 452, "msg": "over quota"})
    deliverer = Deliverer(Tree({"acme/_mail": acme, "beta/_mail": beta}), None, policy=object())
    tx = transaction(
        ("support@acme.example", ACME),
        ("bob@beta.example", BETA),
        ("carol@acme.example", ACME),
        ("dave@beta.example", BETA),
    )
    assert deliver(deliverer, tx) == [
        "250 2.0.0 queued",
        "452 4.2.2 over quota",
        DENY,
        "452 4.2.2 over quota",
    ]
    (acme_env,) = acme.seen
    (beta_env,) = beta.seen
    assert acme_env["_txc"]["lmtp"]["rcpt"] == ["support@acme.example", "carol@acme.example"]
    assert beta_env["_txc"]["lmtp"]["rcpt"] == ["bob@beta.example", "dave@beta.example"]
    everyone = ["support@acme.example", "bob@beta.example", "carol@acme.example", "dave@beta.example"]
    assert acme_env["_txc"]["lmtp"]["transaction_rcpt"] == everyone
    assert beta_env["_txc"]["lmtp"]["transaction_rcpt"] == everyone
    assert acme_env["_txc"]["route"] == {
        "tenant": "acme", "stack": "acme/_mail", "ingress": "domain:acme.example",
        "to": "acme/_mail/0",
    }
    assert acme_env["_txc"]["rid"] != beta_env["_txc"]["rid"]
    assert acme_env["_txc"]["lmtp"]["msg"] is beta_env["_txc"]["lmtp"]["msg"]  # parsed once
    assert acme.messages == beta.messages == [MESSAGE]  # ops get the bytes as received
    assert acme_env["_txc"]["lmtp"]["mail"] == {"from": "alice@example.com", "size": len(MESSAGE)}
    assert acme_env["_txc"]["lmtp"]["client"] == {"ip": "10.0.0.7", "helo": "mail.postfix.example"}
    assert acme_env["_txc"]["lmtp"]["msg"]["subject"] == "wifi keeps dropping"


def test_groups_run_concurrently():
    both_started = asyncio.Event()
    running = []

    class Waiting(FakeStack):
        async def run_async(self, envelope, policy, *, message=None, delivery_key=""):
            running.append(self.name)
            if len(running) == 2:
                both_started.set()
            await asyncio.wait_for(both_started.wait(), timeout=2)
            return await super().run_async(envelope, policy)

    accept = lambda env: {"code": 250}  # noqa: E731
    tree = Tree({"acme/_mail": Waiting("acme/_mail", accept), "beta/_mail": Waiting("beta/_mail", accept)})
    tx = transaction(("a@acme.example", ACME), ("b@beta.example", BETA))
    assert deliver(Deliverer(tree, None, policy=object()), tx) == ["250 2.0.0 OK"] * 2


def test_stack_missing_from_tree_is_default_deny_without_error():
    calls = []
    deliverer = Deliverer(Tree({}), None, policy=object(), trace_sink=lambda *a, **k: calls.append((a, k)))
    tx = transaction(("x@acme.example", ACME), ("y@acme.example", ACME))
    assert deliver(deliverer, tx) == [DENY, DENY]
    ((rid, envelope, result, replies, stack), kwargs), = calls
    assert result is None and not kwargs.get("error")
    assert stack == "acme/_mail"
    assert replies == [("x@acme.example", f"{DENY} (rid {rid})"),
                       ("y@acme.example", f"{DENY} (rid {rid})")]
    assert envelope["_txc"]["rid"] == rid


def test_unrouted_and_missing_routes_are_denied_not_accepted():
    acme = FakeStack("acme/_mail", lambda env: {"code": 250})
    deliverer = Deliverer(Tree({"acme/_mail": acme}), None, policy=object())
    tx = transaction(("a@acme.example", ACME), ("nobody@x.example", None))
    assert deliver(deliverer, tx) == ["250 2.0.0 OK", DENY]
    short = dataclasses.replace(tx, routes=(ACME,))
    assert deliver(deliverer, short) == ["250 2.0.0 OK", DENY]


def test_run_error_tempfails_only_its_group():
    class Failing(FakeStack):
        async def run_async(self, envelope, policy, *, message=None, delivery_key=""):
            result = await super().run_async(envelope, policy)
            return Result(result.envelope, Problem("txcl_run_error", "op ARCHIVE timed out"))

    tree = Tree({
        "acme/_mail": Failing("acme/_mail", lambda env: {"code": 250}),
        "beta/_mail": FakeStack("beta/_mail", lambda env: {"code": 250}),
    })
    tx = transaction(("a@acme.example", ACME), ("b@beta.example", BETA))
    assert deliver(Deliverer(tree, None, policy=object()), tx) == [TEMPFAIL, "250 2.0.0 OK"]


def test_a_raising_stack_is_451_for_its_group_and_traced_with_the_error():
    class Raising(FakeStack):
        async def run_async(self, envelope, policy, *, message=None, delivery_key=""):
            raise RuntimeError("engine bug")

    calls = []
    tree = Tree({
        "acme/_mail": Raising("acme/_mail", dict),
        "beta/_mail": FakeStack("beta/_mail", lambda env: {"code": 250}),
    })
    deliverer = Deliverer(tree, None, policy=object(), trace_sink=lambda *a, **k: calls.append(k))
    tx = transaction(("a@acme.example", ACME), ("b@beta.example", BETA))
    assert deliver(deliverer, tx) == [TEMPFAIL, "250 2.0.0 OK"]
    assert "RuntimeError during the run" in [k.get("error") for k in calls]


def test_a_failing_trace_sink_never_changes_the_replies():
    def broken_sink(*args, **kwargs):
        raise OSError("disk full")

    tree = Tree({"acme/_mail": FakeStack("acme/_mail", lambda env: {"code": 250, "msg": "ok"})})
    deliverer = Deliverer(tree, None, policy=object(), trace_sink=broken_sink)
    assert deliver(deliverer, transaction(("a@acme.example", ACME))) == ["250 2.0.0 ok"]


def test_trace_sink_gets_input_envelope_result_replies_and_stack():
    calls = []
    stack = FakeStack("acme/_mail", lambda env: {"code": 250})
    deliverer = Deliverer(Tree({"acme/_mail": stack}), None, policy=object(),
                          trace_sink=lambda *a, **k: calls.append(a))
    deliver(deliverer, transaction(("a@acme.example", ACME)))
    ((rid, envelope_in, result, replies, traced_stack),) = calls
    assert envelope_in is stack.seen[0]
    assert "res" not in envelope_in["_txc"]["lmtp"]
    assert result.envelope["_txc"]["lmtp"]["res"] == {"code": 250}
    assert replies == [("a@acme.example", f"250 2.0.0 OK (rid {rid})")]  # the lines sent
    assert traced_stack is stack
    assert rid == envelope_in["_txc"]["rid"]


def test_every_reply_of_a_group_ends_with_its_request_id_the_one_its_trace_has():
    traced: dict[str, list[tuple[str, str]]] = {}
    acme = FakeStack("acme/_mail", accept_support)

    class Raising(FakeStack):
        async def run_async(self, envelope, policy, *, message=None, delivery_key=""):
            raise RuntimeError("engine bug")

    tree = Tree({"acme/_mail": acme, "beta/_mail": Raising("beta/_mail", dict)})
    deliverer = Deliverer(tree, None, policy=object(),
                          trace_sink=lambda rid, env, res, replies, *a, **k: traced.update(
                              {rid: replies}))
    gamma = route("gamma", "_mail", "domain:gamma.example")  # routed, but no such stack
    lines = deliver_raw(deliverer, transaction(
        ("support@acme.example", ACME), ("b@beta.example", BETA), ("carol@acme.example", ACME),
        ("g@gamma.example", gamma), ("nobody@x.example", None)))
    acme_rid = acme.seen[0]["_txc"]["rid"]
    assert [rid_of(line) for line in lines[:4]] == [acme_rid, rid_of(lines[1]), acme_rid,
                                                    rid_of(lines[3])]
    assert len({rid_of(line) for line in lines[:4]}) == 3  # one per group
    assert lines[:4] == [f"250 2.0.0 queued (rid {acme_rid})",
                         f"{TEMPFAIL} (rid {rid_of(lines[1])})",  # the run raised
                         f"{DENY} (rid {acme_rid})",  # its slot never written
                         f"{DENY} (rid {rid_of(lines[3])})"]  # default-deny: no stack
    assert lines[4] == DENY  # no group ran for it: no trace to lead to
    assert traced[acme_rid] == [("support@acme.example", lines[0]),
                                ("carol@acme.example", lines[2])]


def test_the_request_id_can_be_left_out_of_the_replies():
    from lmtp.config import Settings

    stack = FakeStack("acme/_mail", lambda env: {"code": 250, "msg": "queued"})
    off = Settings(lmtp_hostname="test", lmtp_reply_rid=False)
    tx = transaction(("a@acme.example", ACME))
    assert deliver_raw(Deliverer(Tree({"acme/_mail": stack}), off, policy=object()), tx) == [
        "250 2.0.0 queued"]


def test_the_input_envelope_is_not_mutated_by_resolution():
    stack = FakeStack("acme/_mail", accept_support)
    deliverer = Deliverer(Tree({"acme/_mail": stack}), None, policy=object())
    deliver(deliverer, transaction(("support@acme.example", ACME)))
    before = copy.deepcopy(stack.seen[0])
    deliver(deliverer, transaction(("support@acme.example", ACME)))
    assert stack.seen[0] == before


def test_unparseable_message_still_delivers_with_raw():
    stack = FakeStack("acme/_mail", lambda env: {"code": 250})
    deliverer = Deliverer(Tree({"acme/_mail": stack}), None, policy=object())
    data = b"\xff\xfe\x00garbage\r\n\r\n--x--\r\n"
    assert deliver(deliverer, transaction(("a@acme.example", ACME), data=data)) == ["250 2.0.0 OK"]
    assert stack.seen[0]["_txc"]["lmtp"]["msg"]["raw"].startswith("b64:")


def test_no_recipients_no_runs():
    assert deliver(Deliverer(Tree({}), None, policy=object()), transaction()) == []


@pytest.mark.parametrize(
    ("routes", "groups", "unrouted"),
    [
        pytest.param([ACME, BETA, ACME], [(ACME, (0, 2)), (BETA, (1,))], [], id="first appearance"),
        pytest.param([BETA, ACME], [(BETA, (0,)), (ACME, (1,))], [], id="order kept"),
        pytest.param([None, ACME, None], [(ACME, (1,))], [0, 2], id="unrouted apart"),
        pytest.param(
            [ACME, Route("acme", "acme/_mail", "recipient:vip@acme.example", "acme/_mail/0")],
            [(ACME, (0, 1))], [], id="same stack via another ingress is one group",
        ),
    ],
)
def test_group_recipients(routes, groups, unrouted):
    found, left = group_recipients(routes)
    assert [(g.route, g.indices) for g in found] == groups
    assert left == unrouted


# --- with the real engine: load_tree on an OPS tree of real .txcl rules -------------------

RULES = {
    "acme/_mail/0/10-support.txcl": (
        "WHEN @lmtp.rcpt.0 =~ /^support@/\n"
        "SET @lmtp.res.recipients.0.code = 250\n"
        'SET @lmtp.res.recipients.0.msg = "queued"\n'
    ),
    "beta/_mail/0/10-classify.txcl": (
        "WHEN @lmtp.msg.subject =~ /wifi/i\n"
        'SET ticket.queue = "network"\n'
    ),
    "beta/_mail/1/10-decide.txcl": (
        'WHEN ticket.queue == "network"\n'
        "SET @lmtp.res.code = 250\n"
        'SET @lmtp.res.msg = "noted\\r\\n250 injected"\n'
    ),
    "gamma/_mail/0/bad-code.txcl": "SET @lmtp.res.code = 990 + 9\n",
    "delta/_mail/0/broken.txcl": "WHEN @lmtp.msg.subject =~ /unterminated\n",
    "epsilon/_mail/0/silent.txcl": 'SET ticket.note = "saw it"\n',
}


@pytest.fixture
def tree(tmp_path):
    from txcl.loader import load_tree

    for rel, text in RULES.items():
        path = tmp_path / "OPS" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_tree(tmp_path / "OPS")


def real_deliverer(tree, tmp_path, trace_sink=None) -> Deliverer:
    from lmtp.config import Settings

    settings = Settings(lmtp_hostname="test", state_dir=tmp_path / "var", ops_dir=tmp_path / "OPS")
    return Deliverer(tree, settings, trace_sink=trace_sink)


def mail_route(tenant: str) -> Route:
    return route(tenant, "_mail", f"domain:{tenant}.example")


def test_real_rules_fan_out_and_stitch_in_rcpt_order(tree, tmp_path):
    assert tree.rejected == {"delta/_mail"}
    tx = transaction(
        ("support@acme.example", mail_route("acme")),
        ("bob@beta.example", mail_route("beta")),
        ("carol@acme.example", mail_route("acme")),
        ("g@gamma.example", mail_route("gamma")),
        ("d@delta.example", mail_route("delta")),
        ("e@epsilon.example", mail_route("epsilon")),
        ("z@zeta.example", mail_route("zeta")),
    )
    assert deliver(real_deliverer(tree, tmp_path), tx) == [
        "250 2.0.0 queued",       # acme: its slot 0
        "250 2.0.0 noted 250 injected",  # beta: stage 1 broadcast, CRLF flattened
        DENY,                     # acme: slot 1 never written
        TEMPFAIL,                 # gamma: 999 is an invalid verdict, the run fails
        TEMPFAIL,                 # delta: the stack failed to load
        DENY,                     # epsilon: rules ran, none wrote a verdict
        DENY,                     # zeta: no such stack
    ]


def test_real_rules_write_traces_through_the_trace_writer(tree, tmp_path):
    from txcl.trace_store import read_trace
    from txcl.trace_writer import TraceWriter

    writer = TraceWriter(tmp_path / "var")
    try:
        tx = transaction(("support@acme.example", mail_route("acme")))
        assert deliver(real_deliverer(tree, tmp_path, writer), tx) == ["250 2.0.0 queued"]
        assert writer.flush()
    finally:
        writer.close()
    trace = read_trace(tmp_path / "var")
    assert "250 2.0.0 queued" in str(trace)
    assert "support@acme.example" in str(trace)


def test_a_stack_gets_only_the_message_fields_its_rules_can_read(tree, tmp_path):
    from lmtp.delivery import TRACED_FIELDS
    from lmtp.message import EVERYTHING, MessageNeeds
    from txcl.trace_writer import TraceWriter

    deliverer = real_deliverer(tree, tmp_path)
    assert deliverer.needs_of(tree.stacks["beta/_mail"]) == MessageNeeds(
        frozenset({"subject"}), frozenset())
    assert deliverer.needs_of(tree.stacks["acme/_mail"]).fields == frozenset()
    assert deliverer.needs_of(FakeStack("x/_mail", accept_support)) == EVERYTHING
    writer = TraceWriter(tmp_path / "var")
    try:  # a trace shows every header field, and the bodies only when the stack reads them
        assert real_deliverer(tree, tmp_path, writer).needs_of(tree.stacks["beta/_mail"]) == (
            TRACED_FIELDS)
    finally:
        writer.close()
    off = TraceWriter(tmp_path / "var", mode="off")
    assert real_deliverer(tree, tmp_path, off).needs_of(tree.stacks["acme/_mail"]) != EVERYTHING


def test_archive_still_stores_the_exact_message_when_nothing_else_is_read(tmp_path):
    from txcl.loader import load_tree

    rule = tmp_path / "OPS" / "acme" / "_mail" / "0" / "10-keep.txcl"
    rule.parent.mkdir(parents=True)
    rule.write_text('SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "kept"\nEXEC "op://ARCHIVE"\n')
    deliverer = real_deliverer(load_tree(tmp_path / "OPS"), tmp_path)
    data = MESSAGE + b"x" * 100_000 + b"\r\n"  # over INLINE_PARSE_BYTES
    tx = transaction(("a@acme.example", mail_route("acme")), data=data)
    assert deliver(deliverer, tx) == ["250 2.0.0 kept"]
    (stored,) = (tmp_path / "var").rglob("Maildir/new/*")
    assert stored.read_bytes() == data


def test_op_needs_come_from_what_each_op_declares_it_reads():
    from lmtp.delivery import op_needs
    from lmtp.message import NOTHING, MessageNeeds
    from txcl.envelope import ANY_SOURCE
    from txcl.ops import OpReads, OpRegistry, RegisteredOp

    def op(envelope, args, ctx):
        return {}

    defaults = op_needs(None)
    assert defaults == {"ARCHIVE": NOTHING, "FORWARD": NOTHING}  # EMIT, WEBHOOK: everything
    # A configured op under a built-in's name declares nothing: it may read anything.
    assert "ARCHIVE" not in op_needs(OpRegistry.default().with_ops({"ARCHIVE": op}))
    registry = OpRegistry.default()
    registry._ops["SUBJ"] = RegisteredOp(
        "SUBJ", op, "test",
        OpReads.only([("_txc", ANY_SOURCE, "msg", "subject"), ("ticket", "id")]),
    )
    assert op_needs(registry)["SUBJ"] == MessageNeeds(frozenset({"subject"}), frozenset())


def test_logged_defects_say_where_and_what_kind_never_the_parsers_text() -> None:
    from lmtp.delivery import defect_kinds

    defects = ["headers: ValueError: invalid address 'ceo@secret.example'",
               "message: unparseable (HeaderParseError)", "headers: truncated, more than 9 lines",
               "body: LookupError: unknown encoding: x-\x1b[31m"]
    shown = defect_kinds(defects)
    assert shown == ("headers: ValueError; message: unparseable (HeaderParseError); "
                     "headers: truncated, more than 9 lines; body: LookupError")
    assert "secret" not in shown
