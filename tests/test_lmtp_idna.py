"""International domains route as one (issue 13, item 11): a U-label domain and its IDNA
A-label (`bücher.example`, `xn--bcher-kva.example`) reach the same route whichever form the
recipient, the config, --lmtp-default-hosts or the tenant_hostnames table uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.config import IngressConfig, Settings, Target
from lmtp.hostnames import HostnameRow
from lmtp.routing import Router, domain_key

U_LABEL, A_LABEL = "bücher.example", "xn--bcher-kva.example"


@pytest.mark.parametrize("form", [U_LABEL, A_LABEL, "BÜCHER.Example.", "XN--BCHER-KVA.example"])
def test_every_form_of_a_domain_has_one_key(form: str) -> None:
    assert domain_key(form) == U_LABEL


@pytest.mark.parametrize("text", ["acme.example", "xn--zz.example", "[127.0.0.1]", ""])
def test_ascii_and_invalid_domains_are_only_normalised(text: str) -> None:
    assert domain_key(text) == text.lower()


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=30))
def test_any_text_gets_a_key_without_an_exception(text: str) -> None:
    assert isinstance(domain_key(text), str)


@pytest.mark.parametrize("configured", [U_LABEL, A_LABEL])
@pytest.mark.parametrize("rcpt_domain", [U_LABEL, A_LABEL])
def test_verified_domains_and_recipients_match_either_form(configured: str,
                                                           rcpt_domain: str) -> None:
    config = IngressConfig(verified_domains={configured: Target("books", None)},
                           recipients={f"vip@{configured}": Target("books", "books/vip")})
    router = Router(config, Settings())
    route = router.route(f"jöse@{rcpt_domain}")
    assert route is not None and route.stack == "books/_mail"
    assert route.ingress == f"domain:{U_LABEL}"
    vip = router.route(f"VIP@{rcpt_domain}")
    assert vip is not None and vip.stack == "books/vip"


@pytest.mark.parametrize("configured", [U_LABEL, A_LABEL])
def test_default_hosts_match_either_form(configured: str) -> None:
    router = Router(IngressConfig(), Settings(lmtp_default_hosts=(configured,)))
    for domain in (U_LABEL, A_LABEL):
        route = router.route(f"acme.support@{domain}")
        assert route is not None and route.stack == "acme/support"


class Table:
    def __init__(self, hostname: str) -> None:
        self.rows = {hostname: HostnameRow(hostname, "books", None, True, 0.0, 0.0)}

    def snapshot(self) -> dict[str, HostnameRow]:
        return self.rows


@pytest.mark.parametrize("stored", [U_LABEL, A_LABEL])
def test_tenant_hostnames_rows_match_either_form(stored: str) -> None:
    router = Router(IngressConfig(), Settings(), Table(stored))
    for domain in (U_LABEL, A_LABEL):
        route = router.route(f"info@{domain}")
        assert route is not None and route.stack == "books/_mail"
