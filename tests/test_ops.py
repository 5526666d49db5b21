"""ops.py: the registry (built-ins, entry points, config ops), command ops, storage."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from txcl import ops as ops_module
from txcl.envelope import ANY_SOURCE
from txcl.errors import TxclLoadError
from txcl.ops import (
    OpContext,
    OpFailure,
    OpReads,
    OpRegistry,
    RegisteredOp,
    StorageError,
    command_op,
)


def context(tmp_path: Path | None, **kw: Any) -> OpContext:
    values: dict[str, Any] = dict(
        tenant="acme", stack="acme/_mail", rid="01R", state_dir=tmp_path, deadline_s=5.0, op="X"
    )
    values.update(kw)
    return OpContext(**values)


class TestStorage:
    def test_storage_is_under_the_tenants_stack_folder(self, tmp_path: Path) -> None:
        folder = context(tmp_path).storage("Maildir", "new")
        assert folder == tmp_path / "tenants" / "acme" / "_mail" / "Maildir" / "new"
        assert folder.is_dir()
        assert context(tmp_path).storage() == tmp_path / "tenants" / "acme" / "_mail"

    @pytest.mark.parametrize("part", ["..", "../../x", "/etc", "a/b", "", ".", "a\\b", "a\0"])
    def test_parts_that_could_leave_it_are_refused(self, tmp_path: Path, part: str) -> None:
        with pytest.raises(StorageError):
            context(tmp_path).storage(part)

    def test_a_symlink_out_of_the_storage_is_refused(self, tmp_path: Path) -> None:
        base = context(tmp_path).storage()
        (base / "out").symlink_to(tmp_path)
        with pytest.raises(StorageError):
            context(tmp_path).storage("out")

    def test_a_checked_folder_that_was_removed_is_made_again(self, tmp_path: Path) -> None:
        folder = context(tmp_path).storage("Maildir")
        folder.rmdir()
        assert context(tmp_path).storage("Maildir") == folder
        assert folder.is_dir()

    def test_no_state_dir_no_storage(self) -> None:
        with pytest.raises(StorageError):
            context(None).storage("x")


def test_builtin_ops_are_registered_by_default() -> None:
    registry = OpRegistry.default()
    assert {"ARCHIVE", "EMIT", "FORWARD", "WEBHOOK"} <= registry.names()
    entry = registry.entry("ARCHIVE")
    assert entry is not None and entry.source == "builtin txcl.builtin_ops.archive"


def test_builtin_ops_declare_what_they_read() -> None:
    registry = OpRegistry.default()
    reads = {name: registry.entry(name).reads for name in ("ARCHIVE", "EMIT", "FORWARD", "WEBHOOK")}  # type: ignore[union-attr]
    assert reads["EMIT"] == reads["WEBHOOK"] == ops_module.ANYTHING  # the whole envelope
    assert reads["ARCHIVE"].message and reads["FORWARD"].message
    assert reads["ARCHIVE"].paths == frozenset({("_txc", "src")})
    assert ("_txc", ANY_SOURCE, "mail", "from") in (reads["FORWARD"].paths or ())
    configured = registry.with_ops({"ARCHIVE": lambda env, args, ctx: {}}, source="config")
    assert configured.entry("ARCHIVE").reads == ops_module.ANYTHING  # type: ignore[union-attr]


def test_entry_points_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    class EntryPoint:
        def __init__(self, name: str, value: Any) -> None:
            self.name, self.value, self._value = name, f"pkg:{name}", value

        def load(self) -> Any:
            return self._value

    def one(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(
        ops_module,
        "_entry_points",
        lambda: (
            EntryPoint("ONE", one),
            EntryPoint("many", {"TWO": one, "THREE": one}),
            EntryPoint("FOUR", RegisteredOp("x", one, "x", OpReads.only([("ticket",)]))),
        ),
    )
    registry = OpRegistry.default()
    four = registry.entry("FOUR")
    assert four is not None and four.fn is one and four.source == "entry point pkg:FOUR"
    assert four.reads == OpReads(frozenset({("ticket",)}))
    assert registry.entry("ONE").reads == ops_module.ANYTHING  # type: ignore[union-attr]
    assert {"ONE", "TWO", "THREE"} <= registry.names()
    assert registry.entry("ONE").fn is one  # type: ignore[union-attr]


def test_config_python_op_with_path(tmp_path: Path) -> None:
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "txcl_test_support_ops.py").write_text(
        "def classify(env, args, ctx):\n    return {'label': args.get('x')}\n"
    )
    registry = OpRegistry.from_config(
        {"CLASSIFY": {"python": "txcl_test_support_ops:classify", "path": "ops"}}, tmp_path
    )
    entry = registry.entry("CLASSIFY")
    assert entry is not None and entry.source == "config"
    assert entry.fn({}, {"x": 1}, context(tmp_path)) == {"label": 1}
    assert "ARCHIVE" in registry  # built-ins are still there


def test_config_problems_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(TxclLoadError) as err:
        OpRegistry.from_config(
            {
                "A": {"python": "no_such_module_xyz:f"},
                "B": {"python": "nocolon"},
                "C": {"command": []},
                "D": {"python": "os:sep"},
                "E": {"python": "a:b", "command": ["x"]},
                "F": {"pyhton": "a:b"},
            },
            tmp_path,
            defaults=False,
        )
    messages = [p.message for p in err.value.problems]
    assert all(p.code == "txcl_load_error" for p in err.value.problems)
    assert messages == [
        "ops.A.python: cannot load no_such_module_xyz:f: ModuleNotFoundError: "
        "No module named 'no_such_module_xyz'",
        "ops.B.python: \"module:function\", not 'nocolon'",
        "ops.C.command: a non-empty list of strings",
        "ops.D.python: os:sep is not callable",
        'ops.E: give either python: "module:function" or command: [...]',
        'ops.F: give either python: "module:function" or command: [...]',
    ]


SCRIPT = textwrap.dedent(
    """\
    import json, os, sys, time
    env = json.load(sys.stdin)
    args = json.loads(os.environ["TXCL_ARGS"])
    if args.get("sleep"):
        time.sleep(args["sleep"])
    if args.get("fail"):
        print("it went wrong", file=sys.stderr)
        sys.exit(3)
    if args.get("garbage"):
        print("not json")
        sys.exit(0)
    print(json.dumps({"seen": {"rcpt": env["rcpt"], "op": os.environ["TXCL_OP"],
                               "stack": os.environ["TXCL_STACK"],
                               "key": os.environ["TXCL_DELIVERY_KEY"]}}))
    """
)


@pytest.fixture
def script_registry(tmp_path: Path) -> OpRegistry:
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "check.py"
    script.write_text(SCRIPT)
    return OpRegistry.from_config(
        {"CHECK": {"command": [sys.executable, str(script)]}}, tmp_path, defaults=False
    )


def test_command_op_reads_envelope_and_prints_a_patch(
    script_registry: OpRegistry, tmp_path: Path
) -> None:
    patch = asyncio.run(
        script_registry.call(
            "CHECK", {"rcpt": ["a@x"]}, {}, context(tmp_path, op="CHECK", delivery_key="k1")
        )
    )
    assert patch == {"seen": {"rcpt": ["a@x"], "op": "CHECK", "stack": "acme/_mail", "key": "k1"}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"fail": True}, "exited with status 3: it went wrong"),
        ({"garbage": True}, "printed no JSON"),
    ],
)
def test_command_op_failures(
    script_registry: OpRegistry, tmp_path: Path, args: dict[str, Any], message: str
) -> None:
    with pytest.raises(OpFailure) as err:
        asyncio.run(script_registry.call("CHECK", {"rcpt": []}, args, context(tmp_path)))
    assert message in str(err.value)


def test_command_op_is_killed_at_the_deadline(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    op = command_op(
        [sys.executable, "-c", f"import time; time.sleep(1); open({str(marker)!r}, 'w')"]
    )

    async def call() -> None:
        await asyncio.wait_for(op({}, {}, context(tmp_path)), 0.2)  # type: ignore[arg-type]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(call())
    assert time.monotonic() - started < 0.9
    time.sleep(1.3)
    assert not marker.exists()  # the process group was killed, not left running


def test_relative_command_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "echo-patch"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.load(sys.stdin)\nprint(json.dumps({{'ok': True}}))\n"
    )
    os.chmod(script, 0o755)
    registry = OpRegistry.from_config(
        {"E": {"command": ["./bin/echo-patch"]}}, tmp_path, defaults=False
    )
    assert asyncio.run(registry.call("E", {}, {}, context(tmp_path))) == {"ok": True}


def test_a_missing_program_is_an_op_failure(tmp_path: Path) -> None:
    op = command_op([str(tmp_path / "nope")])
    with pytest.raises(OpFailure) as err:
        asyncio.run(op({}, {}, context(tmp_path)))  # type: ignore[arg-type]
    assert "cannot start" in str(err.value)


def test_a_delivery_key_ignores_recipient_order_and_tells_deliveries_apart() -> None:
    from txcl.ops import make_delivery_key, message_digest

    digest = message_digest(b"Subject: x\r\n\r\nhi\r\n")
    key = make_delivery_key(digest, "a@x", ["b@y", "c@y"], "acme/_mail")
    assert key == make_delivery_key(digest, "a@x", ["c@y", "b@y", "b@y"], "acme/_mail")
    others = {
        make_delivery_key(message_digest(b"other"), "a@x", ["b@y", "c@y"], "acme/_mail"),
        make_delivery_key(digest, "", ["b@y", "c@y"], "acme/_mail"),
        make_delivery_key(digest, "a@x", ["b@y"], "acme/_mail"),
        make_delivery_key(digest, "a@x", ["b@y", "c@y"], "acme/other"),
    }
    assert key not in others and len(others) == 4


def test_async_calls_past_the_budget_run_in_turn_as_places_free(tmp_path: Path) -> None:
    order: list[str] = []

    async def step(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
        order.append(f"start {args['n']}")
        await asyncio.sleep(0.01)
        order.append(f"end {args['n']}")
        return {"n": args["n"]}

    registry = OpRegistry({"STEP": step})
    ctx = context(tmp_path, tenant="budget-async")

    async def three() -> list[Any]:
        calls = [registry.call("STEP", {}, {"n": n}, ctx, budget=1) for n in range(3)]
        return await asyncio.gather(*calls)

    assert asyncio.run(three()) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert order == ["start 0", "end 0", "start 1", "end 1", "start 2", "end 2"]
    assert ops_module.TENANT_CALLS.running("budget-async") == 0
