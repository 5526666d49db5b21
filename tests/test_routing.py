"""lmtp.routing: the seed's six-step resolution order, one RCPT at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.config import HEAD, IngressConfig, Settings, ingress_config
from lmtp.hostnames import HostnameStore
from lmtp.routing import Route, Router, split_address
from txcl.chassis.config import parse_config


def parse_ingress_config(text: str, name: str = "txco.yaml") -> IngressConfig:
    return ingress_config(parse_config(text, heads=(HEAD,), name=name))


CONFIG = parse_ingress_config(
    """
ingress:
  lmtp:
    recipients:
      "vip@acme.example": {tenant: acme, stack: acme/exec_inbox}
      "@partner.example": {tenant: acme, stack: acme/partners}
      "acme.billing@chassis.example": {tenant: acme, stack: acme/billing}
      "@beta.example": {tenant: beta, stack: beta/wildcard}
    verified_domains:
      acme.example: {tenant: acme}
      beta.example: {tenant: beta, stack: beta/inbound}
      gamma.example: {tenant: gamma}
    listeners:
      default: {tenant: system, stack: system/mail_drop}
"""
)


def settings(**kw) -> Settings:
    kw.setdefault("lmtp_default_hosts", ("chassis.example", "mx.example"))
    return Settings(lmtp_hostname="test", **kw)


@pytest.fixture
def store(tmp_path: Path) -> HostnameStore:
    store = HostnameStore(tmp_path)
    store.add("delta.example", "delta", verified=True)
    store.add("app.epsilon.example", "epsilon", "epsilon/app_mail", verified=True)
    store.add("pending.example", "zeta")
    store.add("gamma.example", "db-gamma", verified=True)  # YAML stand-in wins
    return store


@pytest.fixture
def router(store: HostnameStore) -> Router:
    return Router(CONFIG, settings(), store)


def r(tenant: str, stack: str, ingress: str, listener: str = "") -> Route:
    return Route(tenant, stack, ingress, f"{stack}/0", listener)


DROP = r("system", "system/mail_drop", "listener:default", "default")

ROUTES = [
    # 1. exact recipient
    pytest.param("vip@acme.example", r("acme", "acme/exec_inbox", "recipient:vip@acme.example"),
                 id="1 exact beats verified domain"),
    pytest.param("acme.billing@chassis.example",
                 r("acme", "acme/billing", "recipient:acme.billing@chassis.example"),
                 id="1 exact beats strategy A"),
    # 2. domain wildcard
    pytest.param("anyone@partner.example",
                 r("acme", "acme/partners", "recipient:@partner.example"), id="2 @domain"),
    pytest.param("x@beta.example", r("beta", "beta/wildcard", "recipient:@beta.example"),
                 id="2 @domain beats verified domain"),
    # 3. strategy A
    pytest.param("acme.support@chassis.example",
                 r("acme", "acme/support", "default-host:chassis.example"), id="3 tenant.stack"),
    pytest.param("acme.support+monday@chassis.example",
                 r("acme", "acme/support", "default-host:chassis.example"), id="3 modifier ignored"),
    pytest.param("acme.support+a+b@mx.example",
                 r("acme", "acme/support", "default-host:mx.example"), id="3 second default host"),
    pytest.param("notatenant.fake@chassis.example",
                 r("notatenant", "notatenant/fake", "default-host:chassis.example"),
                 id="3 no tenant existence check"),
    pytest.param("a-1.b-2@chassis.example", r("a-1", "a-1/b-2", "default-host:chassis.example"),
                 id="3 digits and hyphens"),
    # 4. strategy B
    pytest.param("alice@acme.example", r("acme", "acme/_mail", "domain:acme.example"),
                 id="4 verified_domains default _mail"),
    pytest.param("alice@gamma.example", r("gamma", "gamma/_mail", "domain:gamma.example"),
                 id="4 YAML before tenant_hostnames"),
    pytest.param("bob@delta.example", r("delta", "delta/_mail", "hostname:delta.example"),
                 id="4 tenant_hostnames"),
    pytest.param("bob@app.epsilon.example",
                 r("epsilon", "epsilon/app_mail", "hostname:app.epsilon.example"),
                 id="4 tenant_hostnames stack override"),
    pytest.param("bob@pending.example", r("zeta", "zeta/_mail", "hostname:pending.example"),
                 id="4 unverified accepted when not strict"),
    # 5. listener catch-all
    pytest.param("bob@epsilon.example", DROP, id="5 subdomain verification does not cover the apex"),
    pytest.param("bob@sub.delta.example", DROP, id="5 apex verification does not cover subdomains"),
    pytest.param("Acme_Support@chassis.example", DROP, id="5 bad slug falls through"),
    pytest.param("acme@chassis.example", DROP, id="5 no dot falls through"),
    pytest.param("acme.sup.port@chassis.example", DROP, id="5 two dots falls through"),
    pytest.param("1acme.support@chassis.example", DROP, id="5 slug must start with a letter"),
    pytest.param("acme.support@other.example", DROP, id="5 not a default host"),
    pytest.param("postmaster", DROP, id="5 no domain"),
]


@pytest.mark.parametrize(("address", "route"), ROUTES)
def test_resolution_order(router, address, route):
    assert router.route(address) == route


CASES = [
    pytest.param("<vip@acme.example>", "recipient:vip@acme.example", id="angle brackets"),
    pytest.param("VIP@ACME.Example", "recipient:vip@acme.example", id="case-folded exact"),
    pytest.param("x@PARTNER.EXAMPLE", "recipient:@partner.example", id="case-folded wildcard"),
    pytest.param("ACME.Support@Chassis.Example.", "default-host:chassis.example",
                 id="case-folded strategy A, trailing dot"),
    pytest.param('"acme.support"@chassis.example', "default-host:chassis.example",
                 id="quoted local part"),
    pytest.param('"we@ird"@acme.example', "domain:acme.example", id="@ inside quotes"),
    pytest.param("<@relay.example:alice@acme.example>", "domain:acme.example",
                 id="source route dropped"),
    pytest.param("  alice@Acme.Example  ", "domain:acme.example", id="spaces and case"),
]


@pytest.mark.parametrize(("address", "ingress"), CASES)
def test_address_forms(router, address, ingress):
    found = router.route(address)
    assert found is not None and found.ingress == ingress


def test_no_listener_means_unrouted(store):
    config = parse_ingress_config("ingress: {lmtp: {verified_domains: {acme.example: {tenant: acme}}}}")
    router = Router(config, settings(), store)
    assert router.route("x@nowhere.example") is None
    assert router.route("") is None
    assert router.route("<>") is None
    assert router.route("x@acme.example") == r("acme", "acme/_mail", "domain:acme.example")


def test_strict_mode_refuses_unverified_rows(store):
    router = Router(CONFIG, settings(require_hostname_verification=True), store)
    assert router.route("bob@pending.example").ingress == "listener:default"
    assert router.route("bob@delta.example").ingress == "hostname:delta.example"
    assert router.route("alice@acme.example").ingress == "domain:acme.example"  # YAML is trusted


def test_default_hosts_empty_disables_strategy_a(store):
    router = Router(CONFIG, settings(lmtp_default_hosts=()), store)
    assert router.route("acme.support@chassis.example").ingress == "listener:default"


def test_named_listener_falls_back_to_default():
    config = parse_ingress_config(
        "ingress: {lmtp: {listeners: {default: {tenant: sys, stack: sys/drop},"
        " internal: {tenant: ops, stack: ops/inbox}}}}"
    )
    router = Router(config, settings())
    assert router.route("a@b.example", listener="internal") == r(
        "ops", "ops/inbox", "listener:internal", "internal"
    )
    assert router.route("a@b.example", listener="other").ingress == "listener:default"


class CountingStore:
    def __init__(self, store: HostnameStore) -> None:
        self.store, self.reads = store, 0

    def snapshot(self):
        self.reads += 1
        return self.store.snapshot()


def test_hostnames_are_cached_and_refreshed_after_the_ttl(store):
    now = [100.0]
    counting = CountingStore(store)
    router = Router(CONFIG, settings(), counting, hostname_ttl_s=5.0, clock=lambda: now[0])
    for _ in range(50):
        assert router.route("bob@delta.example").tenant == "delta"
    assert counting.reads == 1
    store.add("new.example", "newco", verified=True)
    assert router.route("x@new.example").ingress == "listener:default"  # not yet seen
    now[0] += 5.0
    assert router.route("x@new.example").ingress == "hostname:new.example"
    assert counting.reads == 2
    store.remove("delta.example")
    router.refresh_hostnames()
    assert router.route("bob@delta.example").ingress == "listener:default"


def test_explain_names_each_step_and_the_match(router):
    explanation = router.explain("bob@delta.example")
    assert explanation.route == r("delta", "delta/_mail", "hostname:delta.example")
    assert [step for step, _ in explanation.trail] == [
        "1 recipients[address]",
        "2 recipients[@domain]",
        "3 default hosts",
        "4 verified domains",
    ]
    assert explanation.lines()[-1] == (
        "=> delta delta/_mail (to delta/_mail/0, ingress hostname:delta.example)"
    )


def test_explain_unrouted(store):
    router = Router(parse_ingress_config(""), settings(), store)
    explanation = router.explain("x@nowhere.example")
    assert explanation.route is None
    assert explanation.trail[-1][0] == "5 listeners"
    assert explanation.lines()[-1] == "=> unrouted: 550 5.1.1 no rule accepted this recipient"


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("a@B.example", ("a", "b.example")),
        ("<a@b>", ("a", "b")),
        ('"a b"@c', ("a b", "c")),
        ('"a\\"b"@c', ('a"b', "c")),
        ("nodomain", ("nodomain", "")),
        ("<@x,@y:a@b>", ("a", "b")),
    ],
)
def test_split_address(address, parts):
    assert split_address(address) == parts


@given(st.text(max_size=80))
def test_any_address_routes_or_not_without_raising(address):
    router = Router(CONFIG, settings())
    found = router.route(address)
    assert found is None or found.to == f"{found.stack}/0"
