"""txcl.chassis: a second head can use it without the LMTP head."""

from __future__ import annotations

import subprocess
import sys


def test_the_chassis_imports_no_head() -> None:
    code = (
        "import sys, txcl.chassis.supervisor, txcl.chassis.reload, txcl.chassis.status, "
        "txcl.chassis.config, txcl.chassis.balance; "
        "print(sorted(m for m in sys.modules if m == 'lmtp' or m.startswith('lmtp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
