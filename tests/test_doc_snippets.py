"""The README's code runs as written."""

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_the_readme_snippet_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "the README has no python block"
    script = tmp_path / "snippet.py"
    script.write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor(0)" in proc.stdout  # no non-finite gradient values
