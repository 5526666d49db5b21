#!/usr/bin/env python3
"""CPU-time figures for the two TXCL engine targets, and where the time goes.

Wall time lies on a shared machine, so this measures the process's CPU time
(time.process_time), best of N, on the same inputs as bench/txcl_bench.py:

    python bench/txcl_profile.py lint [--files 10000] [--repeat 1] [--profile]
    python bench/txcl_profile.py runs [--runs 20000] [--repeat 5] [--profile]

--profile prints the top of a cProfile of one measured pass instead of the best time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from txcl_bench import bench_stack, generate_tree  # noqa: E402

from txcl.lint import lint_target  # noqa: E402


def _cpu(fn: Callable[[], object], repeat: int, profile: bool) -> float:
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        fn()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0.0
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def lint(files: int, repeat: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "OPS"
        generate_tree(root, files)
        lint_target(root / "t0" / "s0" / "0", None)  # warm-up: grammar tables, imports

        def once() -> None:
            problems = lint_target(root, None)
            errors = [p for p in problems if p.severity == "error"]
            if errors:
                sys.exit(f"the generated tree should lint clean, got: {errors[0]}")

        seconds = _cpu(once, repeat, profile)
    if not profile:
        print(f"lint of {files} rule files: {seconds:.2f} CPU s (best of {repeat})")


def runs(count: int, repeat: int, profile: bool) -> None:
    stack, env, policy = bench_stack()
    result = stack.run(env, policy)
    run = stack.run

    def once() -> None:
        for _ in range(count):
            run(env, policy)

    seconds = _cpu(once, repeat, profile)
    if not profile:
        print(
            f"20-rule stage ({len(result.fired)} fire): {count / seconds:,.0f} runs per CPU s, "
            f"{1e6 * seconds / count:.1f} us/run (best of {repeat})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("lint", "runs"))
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=0, help="best of N (default: lint 1, runs 5)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.what == "lint":
        lint(args.files, args.repeat or 1, args.profile)
    else:
        runs(args.runs, args.repeat or 5, args.profile)


if __name__ == "__main__":
    main()
