"""Test case results as JUnit XML (the Ant/Jenkins schema CI services read): one
<testsuite> per stack, one <testcase> per case, a case that could not run as <error>."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from txcl.cases import CaseResult


def junit_xml(
    results: Sequence[CaseResult], describe: Callable[[CaseResult], str], not_run: Sequence[str] = ()
) -> bytes:
    """`describe` renders a failed case's details (the text `txcl test` prints). `not_run`:
    why cases did not run (a stack that failed to load), each an <error> case."""
    suites: dict[str, list[CaseResult]] = {}
    for r in results:
        suites.setdefault(r.stack, []).append(r)
    root = ET.Element("testsuites", name="txcl test")
    total = failures = errors = 0
    for stack, cases in suites.items():
        suite = ET.SubElement(root, "testsuite", name=stack)
        n_fail = n_err = 0
        for r in cases:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{stack}.{Path(r.file).stem}",
                name=r.name,
                file=r.file,
                time=f"{(r.result.elapsed_s if r.result else 0.0):.6f}",
            )
            if r.problem is not None:
                n_err += 1
                ET.SubElement(case, "error", message=r.problem.message, type=r.problem.code).text = describe(r)
            elif r.mismatches:
                n_fail += 1
                what = ", ".join(m.what for m in r.mismatches)
                ET.SubElement(case, "failure", message=f"mismatch: {what}", type="mismatch").text = describe(r)
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(n_fail))
        suite.set("errors", str(n_err))
        total, failures, errors = total + len(cases), failures + n_fail, errors + n_err
    if not_run:
        suite = ET.SubElement(root, "testsuite", name="not run", tests=str(len(not_run)), failures="0", errors=str(len(not_run)))
        for i, why in enumerate(not_run, 1):
            case = ET.SubElement(suite, "testcase", classname="not-run", name=f"not run {i}")
            ET.SubElement(case, "error", message=why, type="not-run")
        total, errors = total + len(not_run), errors + len(not_run)
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
