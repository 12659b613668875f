"""The Python steps of scripts/finetune_tiny_cpu.sh (the Hugging Face fine-tune on CPU):

    finetune_tiny_cpu.py make WORK    # WORK/corpus.jsonl (stdlib text) and WORK/hf (a tiny random Llama
                                      # with a byte-level BPE tokenizer trained on that text)
    finetune_tiny_cpu.py check WORK   # transformers loads WORK/export and generates; its weights moved
                                      # away from WORK/hf's, and its logits equal those of the last
                                      # checkpoint in WORK/finetuned (built and loaded by Megatron)

`check` exits with status 1 and says what differs if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CORPUS_BYTES = 400 << 10  # 33 stdlib modules, 426 kB
VOCAB = 512  # divides by 128 x TP for TP = 1, 2, 4: no vocabulary padding, the same logits on both sides
LOGITS_TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # relative; bf16: the two implementations round differently
PROMPT = "def "
FROM_THE_IMPORT = 0.5  # largest relative change of a weight in 30 steps at lr 5e-4 (measured: 0.23)


def make(work: str) -> None:
    from forge_megatron.hf.tiny import tiny_llama
    from forge_megatron.megatron.data import stdlib_files

    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files(CORPUS_BYTES)]
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "corpus.jsonl"), "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    model, tokenizer = tiny_llama(os.path.join(work, "hf"), texts, vocab_size=VOCAB)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {work}/corpus.jsonl ({len(texts)} documents) and {work}/hf (Llama, {parameters / 1e6:.2f} M "
          f"parameters, tokenizer of {len(tokenizer)} ids)")


def check(work: str) -> list[str]:
    """The failed checks (none: the fine-tune went through)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_megatron.hf.config import read_config
    from forge_megatron.hf.exporter import load_megatron_model
    from forge_megatron.hf.model import gpt_logits

    transformers.utils.logging.disable_progress_bar()
    failures = []
    export, original_dir = os.path.join(work, "export"), os.path.join(work, "hf")
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
        failures.append(f"transformers loads {export} with {info}")
    original = dict(AutoModelForCausalLM.from_pretrained(original_dir).named_parameters())
    changes = {name: float((p.detach().double() - original[name].double()).norm() / original[name].double().norm())
               for name, p in model.named_parameters()}
    print(f"weights: relative change from the import {min(changes.values()):.2e} to {max(changes.values()):.2e}")
    # Every matrix moves (a bf16 norm weight of 1.0 may not in a few steps: bf16's spacing there is 2^-7).
    unchanged = [name for name, p in model.named_parameters() if p.dim() == 2 and not changes[name] > 0]
    if unchanged:
        failures.append(f"the fine-tune left {len(unchanged)} weights as imported, e.g. {unchanged[:3]}")
    far = [name for name, change in changes.items() if not change < FROM_THE_IMPORT]
    if far:  # another initialization would be about sqrt(2) away
        failures.append(f"the fine-tune did not start from the import: {far[:3]} moved by more than {FROM_THE_IMPORT}")

    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"transformers generates from {PROMPT!r}: {tokenizer.decode(generated[0])!r}")

    with open(os.path.join(work, "corpus.jsonl")) as f:
        text = json.loads(f.readline())["text"]
    tokens = tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
    _, megatron, ckpt = load_megatron_model(os.path.join(work, "finetuned"), read_config(original_dir))
    expected = gpt_logits(megatron, tokens)[..., :model.config.vocab_size].double()
    with torch.no_grad():
        logits = model(tokens).logits.double()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    difference = float((logits - expected).norm() / expected.norm())
    print(f"logits on {tokens.shape[1]} tokens, {dtype}: transformers (export) against Megatron ({ckpt.path}): "
          f"relative difference {difference:.1e} (tolerance {LOGITS_TOL[dtype]:g})")
    if not difference <= LOGITS_TOL[dtype]:
        failures.append(f"the export's logits differ from the checkpoint's by {difference:.2e}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("make", "check"))
    parser.add_argument("work", help="the fine-tune's working directory")
    args = parser.parse_args(argv)
    if args.step == "make":
        make(args.work)
        return 0
    failures = check(args.work)
    for failure in failures:
        print(f"finetune_tiny_cpu.py: check failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
