"""The multi-tenant OPS tree of issue 17: tenants each with a 4-file, 10-check `_mail` stack
(2-6 rules per file), and one `verified_domains` entry per tenant.

    python bench/scale_tree.py DIR FILES     # DIR/OPS and DIR/txco.yaml, FILES rule files

`bench/scale` builds its trees with `generate`; tests use it for small trees of the same shape.
"""

from __future__ import annotations

import sys
from pathlib import Path

FILES_PER_STACK = 4

# One stack, file by file: (stage/name, rules). "{t}" is the tenant. 13 rules, 10 WHENs. A
# rule without WHEN comes first in its file: after a WHEN it would join that rule's body.
STACK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("0/10-classify.txcl", (
        "WHEN @lmtp.msg.subject =~ /invoice[ -]#?(?P<num>[0-9]+)/i\n"
        "SET {t}.invoice = match.num\n",
        "WHEN @lmtp.mail.from =~ /@{t}-partner\\.example$/\nSET {t}.partner = true\n",
    )),
    ("0/20-headers.txcl", (
        '# every message\nSET {t}.seen = "yes"\n',
        'WHEN @lmtp.msg.headers.list-id.0 =~ /<announce\\.{t}\\./\nSET {t}.list = "announce"\n',
        'WHEN @lmtp.msg.subject =~ /unsubscribe/i\nSET {t}.unsubscribe = true\n',
        "WHEN @lmtp.mail.size > 5000000\nSET {t}.big = true\n",
    )),
    ("1/10-route.txcl", (
        'SET {t}.stage = 1\nSET {t}.queue = "inbox"\n',
        'WHEN @lmtp.rcpt.0 =~ /^(support|help)(\\+[^@]*)?@/i\nSET {t}.queue = "support"\n',
        'WHEN @lmtp.rcpt.0 =~ /^billing@/i\nSET {t}.queue = "billing"\n',
        'WHEN {t}.invoice == "0"\nSET {t}.queue = "void"\n',
    )),
    ("1/20-verdict.txcl", (
        'SET @lmtp.res.code = 250\nSET @lmtp.res.msg = "queued for {t}"\n',
        'WHEN {t}.unsubscribe == true\nSET @lmtp.res.msg = "noted"\n',
        'WHEN {t}.big == true\nSET @lmtp.res.code = 552\nSET @lmtp.res.msg = "too big"\n',
    )),
)


def tenant_name(index: int) -> str:
    return f"t{index:06d}"


def domain_of(tenant: str) -> str:
    return f"{tenant}.example"


def stack_files(tenant: str) -> dict[str, str]:
    """The `_mail` stack of one tenant: relative path -> text."""
    return {name: "\n".join(rule.replace("{t}", tenant) for rule in rules)
            for name, rules in STACK}


def generate(folder: Path, files: int) -> tuple[Path, Path, list[str]]:
    """`folder/OPS` with `files` rule files (files / 4 tenants) and `folder/txco.yaml`
    routing each tenant's domain to it. Returns (ops, config, tenants)."""
    ops = folder / "OPS"
    tenants = [tenant_name(i) for i in range(max(1, files // FILES_PER_STACK))]
    for tenant in tenants:
        for name, text in stack_files(tenant).items():
            path = ops / tenant / "_mail" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    config = folder / "txco.yaml"
    lines = ["ingress:", "  lmtp:", "    verified_domains:"]
    lines += [f"      {domain_of(t)}: {{tenant: {t}}}" for t in tenants]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ops, config, tenants


if __name__ == "__main__":
    generate(Path(sys.argv[1]), int(sys.argv[2]))
