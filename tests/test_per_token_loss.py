"""--calculate-per-token-loss with FORGE, in Megatron's own loop (fp32, 20 steps, clipping active).

Megatron sums the token losses, runs backward, and divides every gradient by the step's token
count (over micro-batches and data-parallel ranks) in finalize_model_grads; the clip coefficient
and the grad norm are those of the divided gradients. FORGE applies the same scale:
* in backward at one micro-batch without data or pipeline parallelism, where the loss function's
  token count is the step's and is known before backward (two-pass clipping here replays the
  micro-batch with the exact coefficient);
* otherwise the step's gradient is held (accumulation buffer, data-parallel owners' rows) and
  applied at the optimizer step, when finalize_model_grads has the global count.
The documents are the standard library's paragraphs with --eod-mask-loss, so the token count
differs from micro-batch to micro-batch, and the optimizer is SGD with momentum (linear in the
gradient: a token scale off by 0.1 % fails these tests, measured). Two-pass clipping matches
standard Megatron (same flags and layout) within 1e-5 in loss, grad norm and weights; stale clipping is checked against
its definition: the coefficient is the previous step's norm's, and the norm FORGE reports is the
norm of the divided gradients (at the first step, before any update, standard Megatron's).
"""

import numpy as np
import pytest
from training_runs import TOL, Run, assert_same_training, run_all

# SGD with momentum: its update is linear in the gradient, so a wrong token scale shows in the weights
# (AdamW's normalized step would hide one that is the same at every step).
PER_TOKEN = ["--calculate-per-token-loss", "--eod-mask-loss", "--clip-grad", "0.05", "--optimizer", "sgd",
             "--sgd-momentum", "0.9", "--lr", "0.3", "--min-lr", "0.03"]
TWO_PASS = ["--use-forge", "--forge-clip-grad-mode", "two-pass"]
STALE = ["--use-forge", "--forge-clip-grad-mode", "stale"]
LAYOUTS = {  # name: (flags, tensor-parallel size, data-parallel size)
    "tp1": ([], 1, 1),  # in backward
    "tp2-k2": (["--micro-batch-size", "2", "--global-batch-size", "4"], 2, 1),  # held: two micro-batches
    "dp2": (["--micro-batch-size", "2", "--global-batch-size", "4"], 1, 2),  # held: the owners' rows
}
STALE_LAYOUTS = ("tp1", "tp2-k2")  # in backward, and held


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    from forge_megatron.megatron.data import write_stdlib_dataset

    return write_stdlib_dataset(str(tmp_path_factory.mktemp("data") / "paragraphs"), max_bytes=1 << 20,
                                documents="paragraphs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, paragraphs):
    work = str(tmp_path_factory.mktemp("per-token"))
    planned = {}
    for layout, (flags, tp, dp) in LAYOUTS.items():
        planned[f"standard-{layout}"] = Run(work, f"standard-{layout}", *PER_TOKEN, *flags, tp=tp, dp=dp)
        planned[f"two-pass-{layout}"] = Run(work, f"two-pass-{layout}", *PER_TOKEN, *TWO_PASS, *flags, tp=tp, dp=dp)
        if layout in STALE_LAYOUTS:
            planned[f"stale-{layout}"] = Run(work, f"stale-{layout}", *PER_TOKEN, *STALE, *flags, tp=tp, dp=dp)
    return run_all(paragraphs, planned)


def test_token_counts_differ_between_micro_batches(paragraphs):
    """Short documents: a 32-token sequence holds from none to several end-of-document tokens,
    which --eod-mask-loss leaves out of the loss."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from forge_megatron.megatron.data import EOD

    dataset = IndexedDataset(paragraphs)  # its arrays are views of its memory map: kept alive while read
    tokens = np.concatenate([np.array(dataset[i]) for i in range(200)])
    per_sequence = [(tokens[i:i + 32] == EOD).sum() for i in range(0, len(tokens) - 32, 32)]
    assert len(set(per_sequence)) >= 3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_pass_clipping_matches_standard_megatron(runs, layout):
    standard, forge = runs[f"standard-{layout}"], runs[f"two-pass-{layout}"]
    norms = standard.record("grad-norm")
    assert len(norms) == 20 and all(n > 0.05 for n in norms.values())  # clipping was active at every step
    for i, norm in forge.record("grad-norm").items():
        assert abs(norm - norms[i]) <= TOL * norms[i], (i, norm, norms[i])
    assert_same_training(forge, standard)


@pytest.mark.parametrize("layout", STALE_LAYOUTS)
def test_stale_clipping_follows_its_definition(runs, layout):
    forge, standard = runs[f"stale-{layout}"], runs[f"standard-{layout}"]
    scale, norm = forge.record("forge/grad-scale"), forge.record("grad-norm")
    assert scale[1] == 1.0 and len(scale) == 20
    for i in range(2, 21):
        assert scale[i] == pytest.approx(min(1.0, 0.05 / (norm[i - 1] + 1e-6)), rel=1e-6), i
    # the first step's norm is the divided gradients', as standard Megatron's (the same weights)
    assert forge.record("grad-norm")[1] == pytest.approx(standard.record("grad-norm")[1], rel=TOL)
    assert all(np.isfinite(v) for v in forge.losses().values())
