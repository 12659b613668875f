"""Test set-up: Triton kernels run interpreted on CPU-only machines, compiled on a GPU."""

import os
import secrets

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # Must be set before any module defining @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import prewarmed  # noqa: E402 - after TRITON_INTERPRET

from forge_megatron.tools import benchmarking  # noqa: E402

# Runs of Megatron's loop fork their ranks from processes that imported torch and Megatron once
# (tests/prewarmed.py): the same entry point and rank environment, without ~10 s of imports per rank.
benchmarking.launch = prewarmed.launch

# pytest-xdist runs two workers (pyproject.toml): one thread each, as many as the CI machine has cores.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


# Property tests (hypothesis). The default profile, "ci" (the README's command, hence CI), is
# derandomized: every run on every machine tries the same examples, so a pass is not luck and a
# failure reproduces by running the test again. HYPOTHESIS_PROFILE=explore draws other examples from a
# seed, FORGE_HYPOTHESIS_SEED=<n> or a random one, printed in pytest's header: rerun a failure with it.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Under "explore", fix the run's seed before hypothesis's plugin reads it (xdist workers get
    the controller's options, so every worker uses the same seed)."""
    if not settings.default.derandomize and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = os.environ.get("FORGE_HYPOTHESIS_SEED", str(secrets.randbits(32)))


def pytest_report_header(config):
    if settings.default.derandomize:
        return f"hypothesis profile {settings.get_current_profile_name()!r}: derandomized (the same examples every run)"
    seed = config.getoption("hypothesis_seed")
    return (f"hypothesis profile {settings.get_current_profile_name()!r}: seed {seed} (rerun with "
            f"HYPOTHESIS_PROFILE={settings.get_current_profile_name()} FORGE_HYPOTHESIS_SEED={seed})")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A fresh random generator per test; the seed is printed so a failure can be replayed
    with FORGE_TEST_SEED=<seed>."""
    seed = int(os.environ.get("FORGE_TEST_SEED", secrets.randbits(31)))
    print(f"{request.node.nodeid}: FORGE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The stdlib byte corpus as a Megatron indexed dataset (1 MiB), for runs of Megatron's loop."""
    from forge_megatron.megatron.data import write_stdlib_dataset

    return write_stdlib_dataset(str(tmp_path_factory.mktemp("data") / "stdlib"), max_bytes=1 << 20)


# The files that run Megatron's loop in subprocesses, longest first (minutes each on the 2-core CI
# machine). pytest-xdist's loadfile hands files to the workers in collection order, so these go
# first and the short files fill in behind them: both workers finish together.
LONG_FILES = ("test_pretrain_gpt.py", "test_moe.py", "test_muon_megatron.py", "test_per_token_loss.py", "test_accumulation_pp.py", "test_memory_measured.py",
              "test_scripts.py", "test_data_parallel.py", "test_hf.py", "test_torch.py", "test_finetune_cpu.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file, and among the short files, is kept
