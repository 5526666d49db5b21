"""The envelope schema (txcl.schema, lmtp/schemas/lmtp.schema.json): every envelope the
inlet builds validates, the docs' envelope section names exactly the schema's fields, and a
schema that cannot be loaded is a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp.message import build_envelope, parse_message
from lmtp.routing import Route
from tests.test_message import MIMEISH, PARTIAL_NEEDS
from txcl import schema

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "examples/inbound-support-mailbox/samples").glob("*.eml"))


def envelope_of(raw: bytes, needs=None, rcpts=("support@acme.example",)) -> dict:
    msg, _ = parse_message(raw) if needs is None else parse_message(raw, needs)
    return build_envelope(
        rid="01M89QNMDCX6Y1R52A6ZNK58CB",
        route=Route("acme", "acme/support", "domain:acme.example", "acme/support/0"),
        listener="default", client_ip="127.0.0.1", helo="vm", mail_from="a@b.example",
        size=len(raw), rcpt=list(rcpts), transaction_rcpt=list(rcpts), msg=msg,
    )


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_sample_envelope_validates(sample):
    assert schema.envelope_problems(envelope_of(sample.read_bytes()), "lmtp") == []


@settings(max_examples=150, deadline=None)
@given(st.one_of(MIMEISH, st.binary(max_size=600)), st.one_of(st.none(), PARTIAL_NEEDS))
def test_every_envelope_of_the_mime_corpus_validates(data, needs):
    assert schema.envelope_problems(envelope_of(data, needs), "lmtp") == []


def test_an_envelope_with_a_wrong_field_says_where_and_what():
    envelope = envelope_of(SAMPLES[0].read_bytes())
    envelope["_txc"]["lmtp"]["mail"]["size"] = "273"
    del envelope["_txc"]["rid"]
    problems = schema.envelope_problems(envelope, "lmtp")
    assert any(p.startswith("_txc.lmtp.mail.size: '273' is not of type 'integer'") for p in problems)
    assert any("'rid' is a required property" in p for p in problems)


def test_a_path_lookup_knows_types_read_only_and_open_maps():
    size = schema.lookup(("_txc", "lmtp", "mail", "size"))
    assert size.unknown is None and size.read_only and "integer" in size.types
    typo = schema.lookup(("_txc", "lmtp", "msg", "subjet"))
    assert typo.unknown == 3 and typo.suggestion == "@lmtp.msg.subject"
    header = schema.lookup(("_txc", "lmtp", "msg", "headers", "x-anything", 0))
    assert header.unknown is None and header.types == {"string"}
    extra = schema.lookup(("_txc", "lmtp", "res", "mine", "deep"))
    assert extra.unknown is None and not extra.read_only
    assert schema.lookup(("tag", "x")) is None
    assert schema.lookup(("_txc", "nosuchsource", "x")) is None


def test_a_hundred_segment_path_is_looked_up_without_trouble():
    deep = ("_txc", "lmtp", "msg", *(f"k{i}" for i in range(100)))
    assert schema.lookup(deep).unknown == 3
    open_deep = ("_txc", "lmtp", "res", *(f"k{i}" for i in range(100)))
    assert schema.lookup(open_deep).unknown is None


def test_a_source_schema_that_cannot_load_is_a_clear_error(monkeypatch):
    class Broken:
        name = "broken"

        def schema(self):
            raise OSError("no such file: broken.schema.json")

    monkeypatch.setattr("txcl.sources.sources", lambda: {"broken": Broken()})
    schema.section_schema.cache_clear()
    try:
        with pytest.raises(schema.SchemaError, match="broken.*cannot be loaded.*broken.schema"):
            schema.lookup(("_txc", "broken", "x"))
    finally:
        schema.section_schema.cache_clear()


def test_a_registered_schema_must_be_a_json_schema():
    with pytest.raises(schema.SchemaError, match="not valid"):
        schema.register_schema("other", {"type": 12})
    with pytest.raises(schema.SchemaError, match="not a JSON object"):
        schema.register_schema("other", [])  # type: ignore[arg-type]


def _schema_fields(node: dict, root: dict, prefix: str, out: set[str]) -> None:
    for branch in schema._branches(node, root):
        for name, sub in (branch.get("properties") or {}).items():
            out.add(prefix + name)
            _schema_fields(sub, root, prefix + name + ".", out)
        items = branch.get("items")
        if isinstance(items, dict):
            _schema_fields(items, root, prefix, out)


def _documented_fields() -> set[str]:
    """The field names of the docs' envelope section: the JSON example's keys (as dotted
    paths under `_txc.lmtp`) and the `msg.x`/`client.x`/... names the prose uses."""
    text = (ROOT / "docs/lmtp.md").read_text()
    section = text.split("## The envelope", 1)[1].split("\n## ", 1)[0]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    out: set[str] = set()

    def walk(value, prefix):
        if isinstance(value, list):
            for item in value:
                walk(item, prefix)
        if isinstance(value, dict):
            for key, sub in value.items():
                if prefix == "msg.headers.":
                    continue  # an open map: its keys are the message's
                out.add(prefix + key)
                walk(sub, prefix + key + ".")

    walk(example["_txc"]["lmtp"], "")
    prose = section.split("```", 2)[2]
    roots = "|".join(("listener", "client", "mail", "rcpt", "transaction_rcpt", "msg", "res"))
    for found in re.finditer(rf"`(?:_txc\.lmtp\.)?((?:{roots})(?:\.[a-z_0-9]+)*)", prose):
        out.add(found.group(1))
    for found in re.finditer(r'`(msg\.[a-z]+)` \(a list of\s+`\{("[^`]*)\}`', prose):
        out.update(f"{found.group(1)}.{k.strip(chr(34))}" for k in found.group(2).split(", "))
    return out


def test_the_docs_envelope_section_and_the_schema_name_the_same_fields():
    root = schema.section_schema("lmtp")
    fields: set[str] = set()
    _schema_fields(root, root, "", fields)
    documented = _documented_fields()
    assert documented - fields == set(), "documented but not in the schema"
    stamped = {f for f in fields if not f.startswith("res")}
    assert stamped - documented == set(), "in the schema but not documented"
