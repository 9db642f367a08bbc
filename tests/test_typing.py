"""The package type-checks: mypy runs in CI as part of the test command."""

import subprocess
import sys

from conftest import ROOT


def test_mypy_is_clean():
    run = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports",
                          "--no-error-summary", str(ROOT / "kong-plugin" / "kong_oauth2_introspection")],
                         capture_output=True, text=True, timeout=600)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert run.returncode == 0 and not errors, "\n".join(errors) or run.stderr
