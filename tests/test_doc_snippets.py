"""Every Python block of README.md and docs/*.md runs as written, each saved as a script and run
in a fresh interpreter from the repository root. A block that cannot run here says so on the line before its fence,
with the reason: <!-- not run: needs a GPU -->."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCK = re.compile(r"^(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)
PRINTS = {"README.md#1": "tensor(0)"}  # what a block must print: the README's step saw no non-finite gradient


def snippets():
    """(code, reason not to run it or None, expected output) for every Python block, by doc#n."""
    for doc in DOCS:
        for n, match in enumerate(BLOCK.finditer(open(os.path.join(ROOT, doc)).read()), 1):
            yield pytest.param(match["code"], match["reason"], PRINTS.get(f"{doc}#{n}", ""), id=f"{doc}#{n}")


@pytest.mark.parametrize("code, not_run, prints", snippets())
def test_the_snippet_runs_as_written(code, not_run, prints, tmp_path):
    if not_run is not None:
        assert not_run.strip(), "a block that is not run says why"
        return
    script = tmp_path / "snippet.py"  # a file, as a reader would save it (a rule's source is read back)
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels' torch twin on CPU
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert prints in proc.stdout, proc.stdout[-2000:]
