"""`txco serve` flags and the `ingress.lmtp` YAML: the seed's defaults, the syntax of each
value, and an error naming the key for every mistake."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.config import (
    HEAD,
    ConfigError,
    IngressConfig,
    ListenAddress,
    Settings,
    Target,
    ingress_config,
    load_ingress_config,
    parse_duration,
    parse_listen_addrs,
    parse_positive_int,
)
from txcl.chassis.config import load_config, parse_config


def parse_ingress_config(text: str, name: str = "txco.yaml") -> IngressConfig:
    return ingress_config(parse_config(text, heads=(HEAD,), name=name))


def test_defaults_are_the_seeds_quick_reference_table() -> None:
    settings = Settings()
    assert settings.personalities == ("cron", "tcp", "web", "admin")
    assert settings.lmtp_listen_addrs == (ListenAddress("tcp", None, 2424),)
    assert settings.lmtp_max_msg_bytes == 26214400
    assert settings.lmtp_max_recipients == 50
    assert settings.lmtp_read_timeout == 30.0
    assert settings.lmtp_data_timeout == 60.0
    assert settings.lmtp_resp_timeout == 30.0
    assert settings.lmtp_hostname == socket.gethostname()
    assert settings.lmtp_default_hosts == ()
    assert settings.require_hostname_verification is False
    assert (settings.ops_dir, settings.config_file, settings.state_dir) == (
        Path("OPS"), None, Path("var"))
    assert "lmtp" not in settings.personalities  # lmtp is not a default personality
    assert settings.lmtp_reply_rid is True  # a Postfix log line leads to its trace


@pytest.mark.parametrize(("flags", "on"), [
    ((), True), (("--lmtp-reply-rid",), True), (("--lmtp-reply-rid=on",), True),
    (("--lmtp-reply-rid=off",), False), (("--lmtp-reply-rid=false",), False),
    (("--lmtp-reply-rid=0",), False),
])
def test_the_request_id_in_replies_is_on_unless_turned_off(flags: tuple[str, ...], on: bool
                                                          ) -> None:
    from lmtp.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--personalities=lmtp", *flags])
    assert settings_from_args(args).lmtp_reply_rid is on


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("45", 45.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "30 seconds", "-1s", "0s", "1d", "abc"])
def test_bad_durations_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--lmtp-read-timeout: "):
        parse_duration(text, "--lmtp-read-timeout")


@given(st.integers(1, 10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_durations_scale_by_their_unit(value: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{value}{unit}") == pytest.approx(value * factor)


def test_positive_ints() -> None:
    assert parse_positive_int(" 50 ", "--lmtp-max-recipients") == 50
    with pytest.raises(ConfigError, match="--lmtp-max-recipients: '0' must be at least 1"):
        parse_positive_int("0", "--lmtp-max-recipients")
    with pytest.raises(ConfigError, match="--lmtp-max-msg-bytes: '25MiB' is not a whole number"):
        parse_positive_int("25MiB", "--lmtp-max-msg-bytes")


@pytest.mark.parametrize(("text", "addresses"), [
    (":2424", [ListenAddress("tcp", None, 2424)]),
    ("10.0.0.5:2424", [ListenAddress("tcp", "10.0.0.5", 2424)]),
    ("localhost:24", [ListenAddress("tcp", "localhost", 24)]),
    ("[::1]:2424", [ListenAddress("tcp", "::1", 2424)]),
    ("unix:/var/run/txco/lmtp.sock", [ListenAddress("unix", path="/var/run/txco/lmtp.sock")]),
    (" unix:/a.sock , :25 ", [ListenAddress("unix", path="/a.sock"),
                              ListenAddress("tcp", None, 25)]),
    ("", []),
])
def test_listen_addrs(text: str, addresses: list[ListenAddress]) -> None:
    assert list(parse_listen_addrs(text)) == addresses


def test_listen_addresses_print_back_as_written() -> None:
    text = ":2424,10.0.0.5:24,[::1]:2424,unix:/run/x.sock"
    assert ",".join(str(a) for a in parse_listen_addrs(text)) == text


@pytest.mark.parametrize(("text", "message"), [
    ("2424", "has no port"),
    (":http", "port must be a number"),
    (":70000", "port must be a number"),
    ("::1:2424", "write IPv6 addresses as [address]:port"),
    ("[::1]2424", "is not [ipv6-address]:port"),
    ("unix:", "names no socket path"),
])
def test_bad_listen_addrs(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_listen_addrs(text)
    assert str(err.value).startswith("--lmtp-listen-addrs: ") and message in str(err.value)


SEED_YAML = """
ingress:
  lmtp:
    verified_domains:
      acme.example:
        tenant: acme
      beta.example:
        tenant: beta
        stack: beta/inbound
    recipients:
      "vip@acme.example":
        tenant: acme
        stack: acme/exec_inbox
      "@Partner.Example":
        tenant: acme
        stack: acme/partners
    listeners:
      default:
        tenant: system
        stack: system/mail_drop
ops:
  CLASSIFY: {python: "support_ops:classify", path: "ops"}
"""


def test_the_seeds_yaml(tmp_path: Path) -> None:
    path = tmp_path / "txco.yaml"
    path.write_text(SEED_YAML)
    config = load_ingress_config(path)
    assert dict(config.verified_domains) == {"acme.example": Target("acme", "acme/_mail"),
                                             "beta.example": Target("beta", "beta/inbound")}
    assert dict(config.recipients) == {"vip@acme.example": Target("acme", "acme/exec_inbox"),
                                       "@partner.example": Target("acme", "acme/partners")}
    assert dict(config.listeners) == {"default": Target("system", "system/mail_drop")}
    shared = load_config(path, heads=("lmtp",))  # the part of the file every head shares
    assert dict(shared.ops) == {"CLASSIFY": {"python": "support_ops:classify", "path": "ops"}}
    assert shared.base_dir == tmp_path


def test_no_file_and_an_empty_file_are_the_empty_config(tmp_path: Path) -> None:
    assert load_ingress_config(None) == IngressConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert dict(load_ingress_config(empty).recipients) == {}


@pytest.mark.parametrize(("yaml_text", "message"), [
    pytest.param("ingress:\n  lmtp:\n    verified_domains:\n      beta.example:\n"
                 "        tenant: beta\n        stack: alpha/inbound\n",
                 "txco.yaml: ingress.lmtp.verified_domains['beta.example'].stack: 'alpha/inbound' "
                 "belongs to tenant 'alpha', but the entry's tenant is 'beta'",
                 id="stack of another tenant"),
    pytest.param("ingress:\n  lmtp:\n    recipients:\n      a@b.example: {tenant: Acme, stack: Acme/x}\n",
                 "txco.yaml: ingress.lmtp.recipients['a@b.example'].tenant: 'Acme' is not a tenant "
                 "name ([a-z][a-z0-9-]*)", id="bad tenant slug"),
    pytest.param("ingress:\n  lmtp:\n    recipients:\n      a@b.example: {tenant: acme, stack: acme/Bad}\n",
                 "txco.yaml: ingress.lmtp.recipients['a@b.example'].stack: 'acme/Bad' is not "
                 "<tenant>/<stack> (stack names match [a-z_][a-z0-9_-]*)", id="bad stack slug"),
    pytest.param("ingress:\n  lmtp:\n    recipients:\n      a@b.example: {tenant: acme}\n",
                 "txco.yaml: ingress.lmtp.recipients['a@b.example'].stack: missing "
                 "(write it as acme/<stack>)", id="recipient without stack"),
    pytest.param("ingress:\n  lmtp:\n    recipients:\n      nobody: {tenant: acme, stack: acme/x}\n",
                 "txco.yaml: ingress.lmtp.recipients['nobody']: not an address (user@domain) "
                 "or a domain wildcard (@domain)", id="recipient key not an address"),
    pytest.param("ingress:\n  lmtp:\n    verified_domain:\n      a.example: {tenant: acme}\n",
                 "txco.yaml: unknown key ingress.lmtp.verified_domain (known: "
                 "ingress.lmtp.recipients, ingress.lmtp.verified_domains, ingress.lmtp.listeners)",
                 id="typo in a section name"),
    pytest.param("ingress:\n  lmtp:\n    listeners:\n      default: {tenant: system, stak: system/x}\n",
                 "txco.yaml: unknown key ingress.lmtp.listeners['default'].stak (known: "
                 "ingress.lmtp.listeners['default'].tenant, "
                 "ingress.lmtp.listeners['default'].stack)", id="typo in an entry"),
    pytest.param("ingress: [lmtp]\n", "txco.yaml: ingress must be a mapping, not a list",
                 id="ingress not a mapping"),
    pytest.param("ingress:\n  lmtp:\n    recipients: {\n", "txco.yaml:4:1: not valid YAML",
                 id="yaml syntax"),
    pytest.param("ingress:\n  lmtp:\n    verified_domains:\n      acme.example: {tenant: acme}\n"
                 "      ACME.example: {tenant: beta}\n",
                 "txco.yaml: ingress.lmtp.verified_domains['ACME.example']: listed twice",
                 id="duplicate domain"),
])
def test_config_errors_name_the_key(yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_ingress_config(yaml_text, name="txco.yaml")
    assert str(err.value).startswith(message)


def test_an_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config file"):
        load_ingress_config(tmp_path / "missing.yaml")


def test_transaction_rcpt_scope_is_a_flag_with_all_as_default() -> None:
    from lmtp.cli import build_parser, settings_from_args

    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve"])).lmtp_transaction_rcpt == "all"
    chosen = parse(["serve", "--lmtp-transaction-rcpt=tenant"])
    assert settings_from_args(chosen).lmtp_transaction_rcpt == "tenant"
    with pytest.raises(SystemExit):
        parse(["serve", "--lmtp-transaction-rcpt=nobody"])
