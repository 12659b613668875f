"""Helpers the benchmark and study scripts share: running forge-pretrain-gpt and writing reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def pretrain_records(argv: list[str]) -> list[dict] | None:
    """Run forge-pretrain-gpt in a fresh process (so an out-of-memory run cannot poison the
    caller); its per-iteration --forge-log-json records, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [sys.executable, "-m", "forge_megatron.cli.pretrain_gpt", *argv, "--forge-log-json", log]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(log):
            return None
        with open(log) as f:
            return [json.loads(line) for line in f]


def write_report(path: str | None, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder); nothing if path is None."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
