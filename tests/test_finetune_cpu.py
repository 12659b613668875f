"""scripts/finetune_tiny_cpu.sh, the Hugging Face fine-tune of docs/finetune.md, end to end as a
user runs it (TP=1): a tiny random Llama and its trained tokenizer, forge-hf-import,
forge-hf-dataset, forge-pretrain-gpt --finetune --use-forge, forge-hf-export, and the script's own
check (scripts/finetune_tiny_cpu.py check: transformers loads and generates, every matrix moved
from the import but stayed near it, and the logits equal the last Megatron checkpoint's)."""

import os
import re
import subprocess
import sys

from forge_megatron.hf.model import LOCAL_SPEC_FLAGS

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune_tiny_cpu.sh")


def test_the_tiny_finetune_runs_end_to_end(tmp_path):
    work = tmp_path / "finetune"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # training runs the kernels' torch twin
    env.update(PYTHON=sys.executable, WORK=str(work), OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    flags = (work / "imported" / "model_flags.txt").read_text().split()
    assert " ".join(LOCAL_SPEC_FLAGS) in " ".join(flags)  # what a run on the import needs, from the import
    assert "loading release distributed checkpoint" in out + proc.stderr  # the fine-tune started from the import
    losses = [float(x) for x in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0], losses  # it learned (iterations 15 and 30)
    difference = re.search(r"float32: transformers \(export\) against Megatron \(.*iter_0000030\): relative difference "
                           r"(\S+) \(tolerance 1e-05\)", out)
    assert difference and float(difference.group(1)) <= 1e-5, out[-2000:]
    assert re.search(r"transformers generates from 'def ': 'def .+'", out)
    assert os.path.exists(work / "export" / "tokenizer.json") and "fine-tuned, exported and checked" in out
