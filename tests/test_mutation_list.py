"""scripts/mutation_check.py plants its mutations by exact text: every one must still find its
original text exactly once in forge_megatron/core, or the check refuses to run (as it did after
core/ changed under it). Cheap, so CI keeps the list in step with the code."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_finds_its_original_text_once():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.check_in_sync(ROOT) == []
    assert len(module.MUTATIONS) >= 13 and all(Path(module.ROOT / t.split("::")[0]).exists() for t in module.TESTS)
