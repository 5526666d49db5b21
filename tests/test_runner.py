"""runner.py: stages and snapshots, SET and EXEC, merge patches, read-only paths, errors."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from txcl import ops as ops_module
from txcl.compiler import compile_file
from txcl.envelope import patch_read_only_reason, read_only_reason, verdict_problem
from txcl.ops import OpContext, OpRegistry
from txcl.parser import parse
from txcl.records import ScrubHints
from txcl.runner import (
    TEST_POLICY,
    RunPolicy,
    Stack,
    StackResult,
    Stage,
)
from txcl.values import MISSING


def stack(*stages: str, name: str = "acme/_mail", numbers: tuple[int, ...] = ()) -> Stack:
    numbers = numbers or tuple(range(len(stages)))
    return Stack(
        name,
        tuple(
            Stage(n, compile_file(parse(text, f"{n}/rules.txcl")), (f"{n}/rules.txcl",))
            for n, text in zip(numbers, stages, strict=True)
        ),
    )


def envelope(**lmtp: Any) -> dict[str, Any]:
    return {
        "_txc": {
            "src": "lmtp",
            "rid": "01TEST",
            "route": {"to": "acme/_mail/0"},
            "lmtp": {"rcpt": ["support@acme.example", "bob@acme.example"], **lmtp},
        }
    }


def res(result: StackResult) -> Any:
    return result.envelope["_txc"]["lmtp"].get("res", MISSING)


def ops_policy(**ops: Any) -> RunPolicy:
    return RunPolicy(registry=OpRegistry(ops))


def wait_for_no_op_calls(tenant: str) -> None:
    deadline = time.monotonic() + 5
    while ops_module.TENANT_CALLS.running(tenant) and time.monotonic() < deadline:
        time.sleep(0.01)


class TestStages:
    def test_rules_of_a_stage_see_the_stage_start_snapshot(self) -> None:
        s = stack(
            "WHEN flag.set != true\nSET flag.set = true\n"
            "WHEN flag.set == true\nSET seen.flag = true\n"
        )
        result = s.run(envelope(), TEST_POLICY)
        assert result.error is None
        assert result.envelope["flag"] == {"set": True}
        assert "seen" not in result.envelope  # the second rule saw the stage-start envelope
        assert len(result.fired) == 1

    def test_a_later_stage_sees_what_earlier_stages_wrote(self) -> None:
        s = stack(
            'SET class.label = "support"\n',
            'WHEN class.label == "support"\nSET @lmtp.res.code = 250\n',
        )
        result = s.run(envelope(), TEST_POLICY)
        assert res(result) == {"code": 250}
        assert [f.stage for f in result.fired] == [0, 1]

    def test_stages_run_in_numeric_order_from_the_entry_stage(self) -> None:
        s = stack('SET order.a = "10"\n', 'SET order.a = "2"\n', numbers=(10, 2))
        assert [st.number for st in s.stages] == [2, 10]
        assert s.run(envelope(), TEST_POLICY).envelope["order"] == {"a": "10"}
        env = envelope()
        env["_txc"]["route"]["to"] = "acme/_mail/5"
        result = s.run(env, TEST_POLICY)
        assert [f.stage for f in result.fired] == [10]

    def test_without_route_the_lowest_stage_is_the_entry(self) -> None:
        env = envelope()
        del env["_txc"]["route"]
        assert len(stack("SET a.b = 1\n", "SET a.c = 1\n").run(env, TEST_POLICY).fired) == 2

    @pytest.mark.parametrize("to", ["beta/_mail/0", "acme/_mail", "acme/_mail/x", 7])
    def test_a_route_to_another_stack_is_a_run_error(self, to: object) -> None:
        env = envelope()
        env["_txc"]["route"]["to"] = to
        result = stack("SET a.b = 1\n").run(env, TEST_POLICY)
        assert result.error is not None
        assert result.error.code == "txcl_run_error"
        assert "does not name a stage of acme/_mail" in result.error.message


class TestSteps:
    def test_fired_records_whens_and_captures(self) -> None:
        s = stack(
            "WHEN @lmtp.rcpt =~ /^(?P<box>[a-z]+)@/\n"
            "SET @lmtp.res.recipients.0.code = 250\n"
            'SET @lmtp.res.recipients.0.msg = "queued for " + match.box\n'
        )
        result = s.run(envelope(), TEST_POLICY)
        (fired,) = result.fired
        assert (fired.stage, str(fired.pos), fired.file) == (0, "0/rules.txcl:1:1", "0/rules.txcl")
        assert [(w.text, w.held) for w in fired.whens] == [
            ("@lmtp.rcpt =~ /^(?P<box>[a-z]+)@/", True)
        ]
        assert fired.captures == {"box": "support"}
        assert res(result) == {"recipients": [{"code": 250, "msg": "queued for support"}]}
        assert [(s.kind, s.path, s.before, s.after) for s in result.steps] == [
            ("set", ("_txc", "lmtp", "res", "recipients", 0, "code"), MISSING, 250),
            ("set", ("_txc", "lmtp", "res", "recipients", 0, "msg"), MISSING, "queued for support"),
        ]

    def test_set_of_a_missing_value_writes_nothing(self) -> None:
        result = stack("SET a.b = @nothing.here\n").run(envelope(), TEST_POLICY)
        assert "a" not in result.envelope
        (step,) = result.steps
        assert step.after is MISSING
        assert step.note == "value is missing: nothing written"

    def test_the_input_envelope_is_never_mutated(self) -> None:
        env = envelope(msg={"subject": "hi"})
        before = copy.deepcopy(env)
        s = stack(
            'SET @lmtp.res.recipients.1.code = 250\nSET other.x = 1\nEXEC "op://PATCH"\n'
        )
        result = s.run(
            env, ops_policy(PATCH=lambda e, a, c: {"_txc": {"lmtp": {"res": {"msg": "x"}}}})
        )
        assert result.error is None
        assert env == before
        assert result.envelope["_txc"]["lmtp"]["res"] == {
            "recipients": [None, {"code": 250}],
            "msg": "x",
        }

    def test_a_non_object_envelope_is_an_error_result(self) -> None:
        result = stack("SET a.b = 1\n").run(["not", "an", "object"], TEST_POLICY)  # type: ignore[arg-type]
        assert result.error is not None
        assert result.error.message == "the envelope must be a JSON object, not list"

    def test_a_write_through_a_scalar_is_a_run_error(self) -> None:
        result = stack("SET a.b = 1\nSET a.b.c = 2\n").run(envelope(), TEST_POLICY)
        assert result.error is not None
        assert result.error.message == "cannot write a.b.c: a.b is a number, not an object"
        assert str(result.error.pos) == "0/rules.txcl:2:1"
        assert result.envelope["a"] == {"b": 1}  # the envelope where the run failed


class TestReadOnly:
    @pytest.mark.parametrize(
        ("target", "reason"),
        [
            ("_txc.src", "_txc.src is read-only"),
            ("@rid", "_txc.rid is read-only"),
            ("@route.to", "_txc.route is read-only"),
            (
                "@lmtp.rcpt.0",
                "_txc.lmtp is stamped by the source and read-only, except _txc.lmtp.res",
            ),
        ],
    )
    def test_set_to_a_read_only_path_fails_the_run(self, target: str, reason: str) -> None:
        result = stack(f'SET {target} = "x"\n').run(envelope(), TEST_POLICY)
        assert result.error is not None
        assert result.error.code == "txcl_run_error"
        assert result.error.message.endswith(reason)

    def test_other_sources_and_own_keys_are_writable(self) -> None:
        assert read_only_reason(("_txc", "lmtp", "res", "code"), "lmtp") is None
        assert read_only_reason(("_txc", "web", "x"), "lmtp") is None
        assert read_only_reason(("ticket", "id"), "lmtp") is None
        assert read_only_reason(("_txc",), "lmtp") is not None

    @pytest.mark.parametrize(
        "patch",
        [
            {"_txc": {"route": {"to": "x"}}},
            {"_txc": {"lmtp": {"rcpt": []}}},
            {"_txc": {"lmtp": None}},
            {"_txc": None},
            {"_txc": {"rid": None}},
        ],
    )
    def test_an_op_patch_to_a_read_only_path_fails_the_run(self, patch: dict[str, Any]) -> None:
        assert patch_read_only_reason(patch, "lmtp") is not None
        result = stack('EXEC "op://BAD"\n').run(envelope(), ops_policy(BAD=lambda e, a, c: patch))
        assert result.error is not None
        assert result.error.message.startswith("op BAD: ")
        assert result.envelope["_txc"] == envelope()["_txc"]

    @pytest.mark.parametrize(
        "source",
        [
            "SET @lmtp.res.code = 999\n",
            'SET @lmtp.res.code = "250"\n',
            "SET @lmtp.res.code = 354\n",
            "SET @lmtp.res.code = true\n",
            "SET @lmtp.res.recipients.1.code = 100\n",
            "SET @lmtp.res = 250\n",
        ],
    )
    def test_an_invalid_verdict_fails_the_run(self, source: str) -> None:
        result = stack(source).run(envelope(), TEST_POLICY)
        assert result.error is not None
        assert result.error.code == "txcl_run_error"

    def test_valid_verdicts(self) -> None:
        for code in (200, 250, 299, 400, 451, 550, 599):
            assert verdict_problem({"_txc": {"lmtp": {"res": {"code": code}}}}, "lmtp") is None

    def test_an_op_writing_an_invalid_verdict_fails_the_run(self) -> None:
        bad = {"_txc": {"lmtp": {"res": {"recipients": [{"code": "abc"}]}}}}
        result = stack('EXEC "op://V"\n').run(envelope(), ops_policy(V=lambda e, a, c: bad))
        assert result.error is not None
        assert "invalid verdict _txc.lmtp.res.recipients.0.code = 'abc'" in result.error.message


class TestOps:
    def test_a_sync_op_gets_envelope_args_and_context_and_its_patch_is_merged(self) -> None:
        seen: dict[str, Any] = {}

        def classify(
            env: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext
        ) -> dict[str, Any]:
            seen.update(args=dict(args), ctx=ctx, thread=threading.current_thread().name)
            return {"class": {"label": "billing"}, "ticket": None}

        s = stack(
            'WITH folder = "Support"\nWITH timeout = "2s"\nEXEC "op://CLASSIFY"\n'
            'WHEN class.label == "billing"\nSET @lmtp.res.code = 250\n'
        )
        env = envelope()
        env["ticket"] = {"id": 1}
        result = s.run(env, ops_policy(CLASSIFY=classify))
        assert result.error is None
        assert result.envelope["class"] == {"label": "billing"}
        assert "ticket" not in result.envelope
        assert seen["args"] == {"folder": "Support"}
        ctx = seen["ctx"]
        assert (ctx.tenant, ctx.stack, ctx.rid, ctx.deadline_s, ctx.op) == (
            "acme",
            "acme/_mail",
            "01TEST",
            2.0,
            "CLASSIFY",
        )
        assert seen["thread"] != threading.main_thread().name  # sync ops run in a worker thread
        (step,) = [s for s in result.steps if s.kind == "exec"]
        assert (step.op, step.executed, step.patch) == (
            "CLASSIFY",
            True,
            {"class": {"label": "billing"}, "ticket": None},
        )
        # the snapshot: stage 0's second rule did not see the op's result
        assert "res" not in result.envelope["_txc"]["lmtp"]

    def test_async_ops_are_awaited(self) -> None:
        async def tag(
            env: Mapping[str, Any], args: Mapping[str, Any], ctx: OpContext
        ) -> dict[str, Any]:
            await asyncio.sleep(0)
            return {"tag": {"n": args["n"]}}

        s = stack('WITH n = 3\nEXEC "op://TAG"\n')
        result = asyncio.run(s.run_async(envelope(), ops_policy(TAG=tag)))
        assert result.envelope["tag"] == {"n": 3}

    def test_sync_run_works_inside_a_running_loop(self) -> None:
        s = stack('EXEC "op://TAG"\n')

        async def inside() -> StackResult:
            return s.run(envelope(), ops_policy(TAG=lambda e, a, c: {"t": 1}))

        assert asyncio.run(inside()).envelope["t"] == 1

    @pytest.mark.parametrize(
        ("op", "message"),
        [
            (lambda e, a, c: 1 / 0, "op X failed: ZeroDivisionError: division by zero"),
            (lambda e, a, c: ["x"], "op X returned list, not a JSON object (a merge patch)"),
            (
                lambda e, a, c: {"a": {1, 2}},
                "op X returned data that is not JSON: a set is not JSON",
            ),
        ],
    )
    def test_a_failing_op_fails_the_run(self, op: Any, message: str) -> None:
        result = stack('SET a.b = 1\nEXEC "op://X"\nSET a.c = 2\n').run(
            envelope(), ops_policy(X=op)
        )
        assert result.error is not None
        assert result.error.message == message
        assert str(result.error.pos) == "0/rules.txcl:2:1"
        assert result.envelope["a"] == {"b": 1}  # stopped at the failure

    def test_an_op_past_its_deadline_fails_the_run(self) -> None:
        async def slow(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            await asyncio.sleep(10)
            return {}

        started = time.monotonic()
        result = stack('WITH timeout = "100ms"\nEXEC "op://SLOW"\n').run(
            envelope(), ops_policy(SLOW=slow)
        )
        assert time.monotonic() - started < 5
        assert result.error is not None
        assert result.error.message == "op SLOW timed out after 0.1s"

    def test_the_policy_timeout_applies_without_with_timeout(self) -> None:
        def slow(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            time.sleep(0.5)
            return {}

        policy = RunPolicy(registry=OpRegistry({"SLOW": slow}), op_timeout_s=0.05)
        result = stack('EXEC "op://SLOW"\n').run(envelope(), policy)
        assert result.error is not None
        assert result.error.message == "op SLOW timed out after 0.05s"

    def test_the_policy_cap_shortens_a_longer_with_timeout(self) -> None:
        async def slow(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            await asyncio.sleep(10)
            return {}

        policy = RunPolicy(registry=OpRegistry({"SLOW": slow}), op_timeout_max_s=0.05)
        result = stack('WITH timeout = "1h"\nEXEC "op://SLOW"\n').run(envelope(), policy)
        assert result.error is not None
        assert result.error.message == "op SLOW timed out after 0.05s"

    def test_a_tenant_past_its_op_budget_waits_within_its_deadline(self) -> None:
        release = threading.Event()
        entered = threading.Barrier(3)

        def hold(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            if not release.is_set():
                entered.wait(5)
                release.wait(10)
            return {}

        policy = RunPolicy(
            registry=OpRegistry({"HOLD": hold}), op_timeout_s=0.05, op_calls_per_tenant=2
        )
        s = stack('EXEC "op://HOLD"\n')
        wait_for_no_op_calls(s.tenant)  # threads of earlier tests count too
        first = [s.run(envelope(), policy) for _ in range(2)]  # time out, threads still held
        entered.wait(5)
        assert [r.error.message for r in first if r.error] == ["op HOLD timed out after 0.05s"] * 2
        third = s.run(envelope(), policy)  # waits for a place; its deadline comes first
        assert third.error is not None
        assert third.error.message == (
            f"op HOLD timed out after 0.05s waiting for a place (tenant {s.tenant} had 2 op "
            "calls running, its budget)")
        assert ops_module.TENANT_CALLS.waiting(s.tenant) == 0
        release.set()
        wait_for_no_op_calls(s.tenant)
        assert s.run(envelope(), policy).error is None

    def test_a_call_past_the_budget_runs_when_a_place_is_free(self) -> None:
        import concurrent.futures

        release = threading.Event()

        def hold(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            release.wait(10)
            return {}

        policy = RunPolicy(
            registry=OpRegistry({"HOLD": hold}), op_timeout_s=10, op_calls_per_tenant=1
        )
        s = stack('EXEC "op://HOLD"\n')
        wait_for_no_op_calls(s.tenant)
        calls = ops_module.TENANT_CALLS

        def until(condition: Any) -> None:
            deadline = time.monotonic() + 5
            while not condition():
                assert time.monotonic() < deadline
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.run, envelope(), policy)
            until(lambda: calls.running(s.tenant) == 1)
            second = pool.submit(s.run, envelope(), policy)  # a loop of its own: handed over
            until(lambda: calls.waiting(s.tenant) == 1)
            release.set()
            assert first.result(10).error is None
            assert second.result(10).error is None
        wait_for_no_op_calls(s.tenant)

    def test_an_unknown_op_fails_the_run(self) -> None:
        result = stack('EXEC "op://NOPE"\n').run(envelope(), ops_policy())
        assert result.error is not None
        assert result.error.message == "unknown op 'NOPE' (EXEC op://NOPE)"

    def test_without_run_ops_stubs_stand_in_and_other_ops_are_not_executed(self) -> None:
        def boom(env: Any, args: Any, ctx: Any) -> dict[str, Any]:
            raise AssertionError("must not be called")

        policy = RunPolicy(
            run_ops=False,
            registry=OpRegistry({"A": boom, "B": boom}),
            op_stubs={"A": {"a": {"done": True}}},
        )
        result = stack('EXEC "op://A"\nEXEC "op://B"\n').run(envelope(), policy)
        assert result.error is None
        assert result.envelope["a"] == {"done": True}
        assert [(s.op, s.executed, s.note) for s in result.steps] == [
            ("A", False, "stub"),
            ("B", False, "not executed"),
        ]


def test_stack_hints_and_ops_are_unions_over_all_rules() -> None:
    s = stack(
        'WHEN false\nWITH omit = "_txc.lmtp.msg.raw"\nEXEC "op://A"\n',
        'WITH omit = "_txc.lmtp.msg.attachments"\nWITH redact = "@lmtp.msg.headers.authorization"\n'
        'EXEC "op://B"\n',
    )
    assert s.hints == ScrubHints(
        omit=("_txc.lmtp.msg.attachments", "_txc.lmtp.msg.raw"),
        redact=("_txc.lmtp.msg.headers.authorization",),
    )
    assert s.ops_used == {"A", "B"}
    assert (s.name, s.tenant) == ("acme/_mail", "acme")


def test_a_run_without_ops_involves_no_event_loop() -> None:
    s = stack("SET a.b = 1\n")
    policy = RunPolicy(registry=OpRegistry({}))
    original = asyncio.run
    try:
        asyncio.run = None  # type: ignore[assignment]
        result = s.run(envelope(), policy)
    finally:
        asyncio.run = original
    assert result.error is None
    assert result.elapsed_s >= 0
