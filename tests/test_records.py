"""records.py: one shape per step, and the one JSON rendering of a run."""

from __future__ import annotations

import json

from txcl.errors import Pos
from txcl.records import (
    ExecRecord,
    Fired,
    ScrubHints,
    SetRecord,
    StackResult,
    WhenOutcome,
    fired_json,
    run_json,
    step_json,
)
from txcl.values import MISSING

POS = Pos("OPS/acme/_mail/0/10.txcl", 3, 1)


def test_a_set_renders_its_path_text_and_leaves_missing_values_out() -> None:
    written = SetRecord(0, POS, ("_txc", "lmtp", "res", "code"), MISSING, 250)
    assert step_json(written) == {
        "kind": "set", "stage": 0, "pos": "OPS/acme/_mail/0/10.txcl:3:1",
        "path": "_txc.lmtp.res.code", "after": 250,
    }
    skipped = SetRecord(1, POS, ("headers", "x.y"), "old", MISSING, "value is missing")
    assert step_json(skipped) == {
        "kind": "set", "stage": 1, "pos": str(POS), "path": 'headers."x.y"',
        "before": "old", "note": "value is missing",
    }


def test_an_exec_renders_its_own_fields_only() -> None:
    step = ExecRecord(0, POS, "ARCHIVE", {"folder": "x"}, {"archive": {}}, True, "", 0.002)
    assert step_json(step) == {
        "kind": "exec", "stage": 0, "pos": str(POS), "op": "ARCHIVE",
        "args": {"folder": "x"}, "patch": {"archive": {}}, "executed": True, "elapsed_s": 0.002,
    }
    assert step_json(ExecRecord(0, POS, "A", note="stub"))["note"] == "stub"


def test_a_run_renders_as_plain_json() -> None:
    fired = Fired(0, POS, POS.file, (WhenOutcome("x == 1", POS, True),), {"n": "1"})
    result = StackResult({}, (fired,), (SetRecord(0, POS, ("a",), MISSING, [1]),))
    doc = run_json(result)
    assert doc["fired"] == [fired_json(fired)]
    assert doc["fired"][0] == {
        "stage": 0, "pos": str(POS), "file": POS.file,
        "whens": [{"text": "x == 1", "pos": str(POS), "held": True}], "captures": {"n": "1"},
    }
    assert json.loads(json.dumps(doc)) == doc


def test_scrub_hints_from_what_callers_hold() -> None:
    hints = ScrubHints(("a.b",), ("c",))
    assert ScrubHints.of(hints) is hints
    assert ScrubHints.of(None) == ScrubHints() and not ScrubHints()
    assert ScrubHints.of({"omit": "b.c, a.b", "redact": ["c"]}) == ScrubHints(("a.b", "b.c"), ("c",))
    assert ScrubHints.of(hints).omit == ("a.b",)
