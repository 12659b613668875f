"""The data flags are checked before Megatron starts (forge_megatron/megatron/data_checks.py): a
--split part with no document (on which Megatron's GPTDataset index never finishes building) and
a missing dataset are one line and exit status 2, never a hang."""

import argparse

import numpy as np
import pytest
from training_runs import BASE

from forge_megatron.hf.dataset import write_token_documents
from forge_megatron.megatron.data_checks import check_data
from forge_megatron.megatron.errors import ConfigurationError
from forge_megatron.tools.benchmarking import run_pretrain


def documents(tmp_path, n: int, name: str = "corpus") -> str:
    return write_token_documents(str(tmp_path / name), [np.arange(1 + i, 40 + i) for i in range(n)], 257)


def data_args(**flags) -> argparse.Namespace:
    """The data flags Megatron's get_blend_and_blend_per_split reads, as Megatron's parser leaves them."""
    defaults = dict(data_path=None, data_args_path=None, train_data_path=None, valid_data_path=None,
                    test_data_path=None, per_split_data_args_path=None, split="969, 30, 1", mock_data=False)
    return argparse.Namespace(**{**defaults, **flags})


def test_a_split_part_without_documents_is_refused(tmp_path):
    two = documents(tmp_path, 2)
    with pytest.raises(ConfigurationError, match=rf"--split 98,2,0 leaves the validation part of {two} \(2 documents\) "
                                                 "empty, on which Megatron's dataset index never finishes building"):
        check_data(data_args(data_path=[two], split="98,2,0"))
    with pytest.raises(ConfigurationError, match="leaves the test part"):  # fewer documents than parts
        check_data(data_args(data_path=[two], split="60,20,20"))
    check_data(data_args(data_path=[two], split="50,50,0"))  # a zero part is not built
    check_data(data_args(data_path=[two], split="100,0,0"))
    weighted = ["0.5", documents(tmp_path, 30, "large"), "0.5", two]  # every dataset of a blend is split
    with pytest.raises(ConfigurationError, match=f"validation part of {two}"):
        check_data(data_args(data_path=weighted, split="90,10,0"))
    check_data(data_args(mock_data=True))


def test_missing_or_empty_datasets_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match=f"--data-path {tmp_path}/nothing: no {tmp_path}/nothing.idx and "
                                                 f"{tmp_path}/nothing.bin; write them with forge-hf-dataset"):
        check_data(data_args(data_path=[str(tmp_path / "nothing")]))
    empty, one = documents(tmp_path, 0, "empty"), documents(tmp_path, 1, "one")
    with pytest.raises(ConfigurationError, match=f"--valid-data-path {empty} holds no document"):
        check_data(data_args(train_data_path=[one], valid_data_path=[empty]))
    check_data(data_args(train_data_path=[one], valid_data_path=[one]))  # a dedicated set is used whole


def test_forge_pretrain_gpt_refuses_an_empty_validation_part_in_one_line(tmp_path):
    """docs/finetune.md's --split 98,2,0 on a two-document corpus: Megatron alone hangs."""
    argv = [*BASE, "--data-path", documents(tmp_path, 2), "--split", "98,2,0", "--use-forge"]
    proc = run_pretrain(argv, timeout=120)  # a hang fails here
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("forge-pretrain-gpt: error: --split 98,2,0 leaves the "
                                                     "validation part"), errors
    assert "Traceback" not in proc.stderr
