"""The code passes the linter configured in pyproject.toml (unused names, bug patterns, imports)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "forge_megatron", "scripts", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
