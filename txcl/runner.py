"""One stack over one envelope: stage snapshots, SET and EXEC in order, a StackResult.

Per stage, every rule's WHENs are evaluated against the envelope as it stood when the stage
began; then the bodies of the rules that fired run in order. Writes never mutate what they
were given (paths.compile_setter and merge_patch copy only the containers on the written
path), so the stage-start envelope *is* the snapshot: nothing is copied to keep it, and the
caller's envelope is never changed.

`run_async` of a stack of more than SLICED_RULES rules, or over a message of more than
SLICED_MESSAGE_BYTES, gives the event loop a turn every SLICE_S between rules (the
stage-start snapshot makes that safe); ordinary stacks run without a clock check.

A run never raises for what rules and ops do: a failing op, a timeout, a write to a
read-only path or an invalid verdict stops the run and comes back as `StackResult.error`
(txcl_run_error), with the envelope as it was at that point.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from txcl.compiler import (
    BOUND,
    NO_CAPTURES,
    Captures,
    CompiledRule,
    ExecStep,
    SetStep,
    noting_test,
)
from txcl.envelope import (
    TXC,
    patch_read_only_reason,
    read_only_reason,
    rid_of,
    route_to,
    source_of,
    verdict_problem,
)
from txcl.errors import Pos, Problem, TxclError
from txcl.ops import WAITING_FOR_PLACE, OpContext, OpRegistry
from txcl.paths import PathWriteError, merge_patch
from txcl.records import (
    ExecRecord,
    Fired,
    ScrubHints,
    SetRecord,
    StackResult,
    StageStart,
    Step,
    WhenOutcome,
)
from txcl.values import MISSING, json_problem, to_json

__all__ = [
    "DEFAULT_POLICY",
    "TEST_POLICY",
    "ExecRecord",
    "Fired",
    "RunPolicy",
    "ScrubHints",
    "SetRecord",
    "Stack",
    "StackResult",
    "Stage",
    "Step",
    "WhenOutcome",
]

RUN_ERROR: Final = "txcl_run_error"
# A run that may take long (a stack of many rules, or a large message) gives the event loop
# a turn whenever it has held it this long, so other sessions are still answered.
SLICE_S: Final = 0.005
SLICED_RULES: Final = 64  # stacks with more rules than this run in slices
SLICED_MESSAGE_BYTES: Final = 1024 * 1024  # and so does a run over a message this large


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunPolicy:
    """How to run: immutable; change a copy with dataclasses.replace()."""

    run_ops: bool = True  # `txcl test` turns ops off: no side effects
    op_timeout_s: float = 5.0  # an op's deadline when its rule gives no WITH timeout
    registry: OpRegistry | None = None  # None: built-ins and entry points
    op_stubs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    state_dir: Path | None = None  # ops' storage lives under it
    op_timeout_max_s: float | None = None  # caps every op's deadline, WITH timeout too
    op_calls_per_tenant: int | None = None  # op calls a tenant may have running; None: any
    # Keep each stage's rules and starting envelope (references), and where each rule's test
    # stopped, for txcl.explain: asked by `txcl test --explain`, and by a server whose traces
    # are on (the writer explains).
    explain: bool = False


DEFAULT_POLICY: Final = RunPolicy()
TEST_POLICY: Final = RunPolicy(run_ops=False)


@dataclass(frozen=True, slots=True)
class Stage:
    number: int
    rules: tuple[CompiledRule, ...]  # files in byte-wise name order, rules in source order
    files: tuple[str, ...] = ()


@functools.cache
def _default_registry() -> OpRegistry:
    return OpRegistry.default()


class _Failure(Exception):
    def __init__(self, message: str, pos: Pos | None) -> None:
        super().__init__(message)
        self.problem = Problem(RUN_ERROR, message, pos)


# --- the stack ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RulePlan:
    """A rule as a stage runs it, with the records that do not depend on the envelope built
    once: the Fired of a firing without captures, and the SetRecord of each constant SET to
    a place that was empty. They are frozen, so every run may share them."""

    rule: CompiledRule
    fired: Fired  # with NO_CAPTURES
    steps: tuple[tuple[SetStep | ExecStep, SetRecord | None], ...]
    # How a run under RunPolicy(explain=True) tests a rule of several WHENs: rule.test that
    # also appends the index of the first WHEN that did not hold (None when all held) to a
    # list. None for one WHEN or none: rule.test's outcome says where it stopped.
    test_noting: Callable[[Any, list[int | None]], Captures | None] | None

    @classmethod
    def of(cls, rule: CompiledRule, stage: int) -> _RulePlan:
        outcomes = tuple(WhenOutcome(w.text, w.pos, True) for w in rule.whens)
        steps = tuple(
            (
                step,
                SetRecord(stage, step.pos, step.target, MISSING, step.constant)
                if isinstance(step, SetStep) and step.constant is not MISSING
                else None,
            )
            for step in rule.steps
        )
        fired = Fired(stage, rule.pos, rule.file, outcomes, NO_CAPTURES)
        return cls(rule, fired, steps, noting_test(rule.whens))


@dataclass(frozen=True)
class Stack:
    """A compiled stack `tenant/stack`: its stages in ascending order."""

    name: str
    stages: tuple[Stage, ...]
    tenant: str = field(init=False)
    hints: ScrubHints = field(init=False)
    ops_used: frozenset[str] = field(init=False)
    _plan: tuple[tuple[int, tuple[_RulePlan, ...]], ...] = field(
        init=False, repr=False, compare=False
    )
    _long: bool = field(init=False, repr=False, compare=False)
    _rules_of: dict[int, tuple[CompiledRule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stages = tuple(sorted(self.stages, key=lambda s: s.number))
        rules = [rule for stage in stages for rule in stage.rules]
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "tenant", self.name.partition("/")[0])
        object.__setattr__(
            self,
            "hints",
            ScrubHints(
                tuple(sorted({p for r in rules for p in r.omit})),
                tuple(sorted({p for r in rules for p in r.redact})),
            ),
        )
        object.__setattr__(self, "ops_used", frozenset(op for r in rules for op in r.ops))
        plan = tuple(
            (stage.number, tuple(_RulePlan.of(rule, stage.number) for rule in stage.rules))
            for stage in stages
        )
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_long", len(rules) > SLICED_RULES)
        object.__setattr__(self, "_rules_of", {stage.number: stage.rules for stage in stages})

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        return tuple(rule for stage in self.stages for rule in stage.rules)

    def run(
        self,
        envelope: Any,
        policy: RunPolicy = DEFAULT_POLICY,
        *,
        message: bytes | None = None,
        delivery_key: str = "",
    ) -> StackResult:
        """Run the stack synchronously. Without op calls no event loop is involved.

        `message`: the raw message the envelope was built from, when the caller has it; ops
        get it as `OpContext.message` instead of decoding `_txc.<src>.msg.raw`.
        `delivery_key`: `OpContext.delivery_key` (`txcl.ops.make_delivery_key`)."""
        if not (policy.run_ops and self.ops_used):
            coro = self._run(envelope, policy, message, delivery_key, sliced=False)
            try:
                coro.send(None)
            except StopIteration as done:
                result: StackResult = done.value
                return result
            coro.close()  # unreachable by construction: only op calls await
        return _run_coroutine(
            self.run_async(envelope, policy, message=message, delivery_key=delivery_key)
        )

    async def run_async(
        self,
        envelope: Any,
        policy: RunPolicy = DEFAULT_POLICY,
        *,
        message: bytes | None = None,
        delivery_key: str = "",
    ) -> StackResult:
        """Run the stack; only op calls await (sync ops in a worker thread). `message` and
        `delivery_key` as for `run`."""
        sliced = self._long or (message is not None and len(message) > SLICED_MESSAGE_BYTES)
        return await self._run(envelope, policy, message, delivery_key, sliced=sliced)

    async def _run(
        self,
        envelope: Any,
        policy: RunPolicy,
        message: bytes | None,
        delivery_key: str,
        *,
        sliced: bool,  # give the loop a turn every SLICE_S (run_async only)
    ) -> StackResult:
        started = time.perf_counter()
        fired: list[Fired] = []
        steps: list[Step] = []
        snapshots: list[StageStart] | None = [] if policy.explain else None
        if not isinstance(envelope, dict):
            kind = type(envelope).__name__
            refused = Problem(RUN_ERROR, f"the envelope must be a JSON object, not {kind}")
            return StackResult(envelope, (), (), refused, time.perf_counter() - started)
        env: dict[str, Any] = envelope
        pos: Pos | None = None
        turn_ends = started + SLICE_S
        problem: Problem | None = None
        try:
            src = source_of(env)
            entry = self._entry_stage(env)
            for number, plans in self._plan:
                if number < entry:
                    continue
                snapshot = env
                noted: list[int | None] | None = None
                if snapshots is not None:
                    noted = []
                    snapshots.append(StageStart(number, self._rules_of[number], snapshot, noted))
                hits = []
                for plan in plans:
                    if sliced and time.perf_counter() >= turn_ends:
                        await asyncio.sleep(0)
                        turn_ends = time.perf_counter() + SLICE_S
                    if noted is None:
                        captures = plan.rule.test(snapshot)
                    elif plan.test_noting is None:
                        captures = plan.rule.test(snapshot)
                        noted.append(None if captures is not None else 0)
                    else:
                        captures = plan.test_noting(snapshot, noted)
                    if captures is not None:
                        hits.append((plan, captures))
                        if captures is NO_CAPTURES:
                            fired.append(plan.fired)
                        else:
                            template = plan.fired
                            fired.append(
                                Fired(number, template.pos, template.file, template.whens, captures)
                            )
                for plan, captures in hits:
                    if sliced and time.perf_counter() >= turn_ends:
                        await asyncio.sleep(0)
                        turn_ends = time.perf_counter() + SLICE_S
                    for step, written in plan.steps:
                        pos = step.pos
                        if step.__class__ is SetStep:
                            env = _set(env, step, written, captures, src, number, steps)
                        else:
                            env = await self._exec(
                                env,
                                step,  # type: ignore[arg-type]
                                plan.rule,
                                captures,
                                src,
                                number,
                                policy,
                                steps,
                                (message, delivery_key),
                            )
        except _Failure as failure:
            problem = failure.problem
        except TxclError as err:
            problem = err.problem
        except Exception as err:  # a bug must still end as a failed run, never an accept
            problem = Problem(RUN_ERROR, f"internal error: {type(err).__name__}: {err}", pos)
        elapsed = time.perf_counter() - started
        if snapshots is None:
            return StackResult(env, tuple(fired), tuple(steps), problem, elapsed)
        return StackResult(env, tuple(fired), tuple(steps), problem, elapsed, tuple(snapshots))

    def _entry_stage(self, env: dict[str, Any]) -> int:
        to = route_to(env)
        if to is MISSING:
            return self.stages[0].number if self.stages else 0
        stack, _, stage = to.rpartition("/") if isinstance(to, str) else ("", "", "")
        if stack != self.name or not stage.isdigit():
            raise _Failure(
                f"_txc.route.to = {to!r} does not name a stage of {self.name} "
                f'(expected "{self.name}/<stage>")',
                None,
            )
        return int(stage)

    async def _exec(
        self,
        env: dict[str, Any],
        step: ExecStep,
        rule: CompiledRule,
        captures: Captures,
        src: str | None,
        stage: int,
        policy: RunPolicy,
        steps: list[Step],
        delivery: tuple[bytes | None, str],  # the message and the delivery key
    ) -> dict[str, Any]:
        name = step.op
        args = rule.evaluate_args(env, captures)
        started = time.perf_counter()
        executed = False
        if not policy.run_ops:
            stub = policy.op_stubs.get(name, MISSING)
            patch: Any = {} if stub is MISSING else stub
            note = "not executed" if stub is MISSING else "stub"
        else:
            patch = await self._call_op(env, step, rule, args, policy, delivery)
            executed, note = True, ""
        elapsed = time.perf_counter() - started
        if not isinstance(patch, dict):
            raise _Failure(
                f"op {name} returned {type(patch).__name__}, not a JSON object (a merge patch)",
                step.pos,
            )
        problem = json_problem(patch)
        if problem:
            raise _Failure(f"op {name} returned data that is not JSON: {problem}", step.pos)
        reason = patch_read_only_reason(patch, src)
        if reason:
            raise _Failure(f"op {name}: {reason}", step.pos)
        steps.append(ExecRecord(stage, step.pos, name, args, patch, executed, note, elapsed))
        if patch:
            env = merge_patch(env, patch)
            txc = patch.get(TXC)
            if src is not None and isinstance(txc, dict) and src in txc:
                verdict = verdict_problem(env, src)
                if verdict:
                    raise _Failure(f"op {name}: {verdict}", step.pos)
        return env

    async def _call_op(
        self,
        env: dict[str, Any],
        step: ExecStep,
        rule: CompiledRule,
        args: dict[str, Any],
        policy: RunPolicy,
        delivery: tuple[bytes | None, str],
    ) -> Any:
        name = step.op
        registry = policy.registry if policy.registry is not None else _default_registry()
        if name not in registry:
            raise _Failure(f"unknown op {name!r} (EXEC {step.uri})", step.pos)
        deadline = rule.timeout_s if rule.timeout_s is not None else policy.op_timeout_s
        if policy.op_timeout_max_s is not None:
            deadline = min(deadline, policy.op_timeout_max_s)
        ctx = OpContext(
            tenant=self.tenant,
            stack=self.name,
            rid=rid_of(env),
            state_dir=policy.state_dir,
            deadline_s=deadline,
            op=name,
            message=delivery[0],
            delivery_key=delivery[1],
        )
        try:
            # In the caller's task: wait_for would start a task per call, and its first step
            # and its result would each wait a turn of a busy event loop.
            async with asyncio.timeout(deadline):
                return await registry.call(
                    name, env, args, ctx, budget=policy.op_calls_per_tenant
                )
        except TimeoutError:
            waited = WAITING_FOR_PLACE.get()
            WAITING_FOR_PLACE.set(False)
            note = (f" waiting for a place (tenant {self.tenant} had "
                    f"{policy.op_calls_per_tenant} op calls running, its budget)" if waited else "")
            raise _Failure(f"op {name} timed out after {deadline:g}s{note}", step.pos) from None
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # SystemExit, KeyboardInterrupt: the op's end, not ours
            raise _Failure(f"op {name} failed: {type(err).__name__}: {err}", step.pos) from None


def _set(
    env: dict[str, Any],
    step: SetStep,
    written: SetRecord | None,  # the record of this write to an empty place, if built once
    captures: Captures,
    src: str | None,
    stage: int,
    steps: list[Step],
) -> dict[str, Any]:
    if step.wildcard:  # written at each index the rule's WHENs bound
        indices: Any = captures.get(BOUND, ())  # ints, beside the string captures
        for index in indices:
            env = _set(env, step.at(index), None, captures, src, stage, steps)
        return env
    target = step.target
    if target[0] == TXC:
        reason = read_only_reason(target, src)
        if reason:
            raise _Failure(f"SET {step.target_text}: {reason}", step.pos)
    value = step.value(env, captures)
    before = step.read(env)
    # Records built with every field given in order: the generated __init__ is at its fastest.
    if value is MISSING:
        note = "value is missing: nothing written"
        steps.append(SetRecord(stage, step.pos, target, before, MISSING, note))
        return env
    value = to_json(value)
    try:
        env = step.write(env, value)
    except PathWriteError as err:
        raise _Failure(str(err), step.pos) from None
    if written is not None and before is MISSING:
        steps.append(written)
    else:
        steps.append(SetRecord(stage, step.pos, target, before, value))
    if src is not None and len(target) > 1 and target[0] == TXC and target[1] == src:
        problem = verdict_problem(env, src)
        if problem:
            raise _Failure(problem, step.pos)
    return env


def _run_coroutine(coro: Coroutine[Any, Any, StackResult]) -> StackResult:
    """Run to completion from sync code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
