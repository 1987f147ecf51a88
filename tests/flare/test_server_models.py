"""The server's global models hold exactly what their jobs' sites exchange."""

from __future__ import annotations

import pytest
import torch

from fedllm.checkpoint.errors import CheckpointError
from fedllm.flare.server_models import NemoCheckpointWeights, ParameterTree, split_shard_key
from tests.support.nemo_files import gpt_config, gpt_shard, write_nemo


def test_sft_server_model_holds_the_checkpoint_keys(tmp_path):
    shards = [gpt_shard(64, 128, 2), gpt_shard(64, 128, 2)]
    path = write_nemo(tmp_path / "gpt.nemo", gpt_config(tp=2), shards)
    state = NemoCheckpointWeights(str(path)).state_dict()
    assert len(state) == 6
    for key, value in state.items():
        rank, inner = split_shard_key(key)
        assert torch.equal(value, shards[rank][inner])
    single = write_nemo(tmp_path / "tp1.nemo", gpt_config(tp=1), [gpt_shard(64, 128, 1)])
    assert set(NemoCheckpointWeights(str(single)).state_dict()) == set(gpt_shard(64, 128, 1))


def test_sft_server_model_refuses_a_checkpoint_with_a_missing_shard(tmp_path):
    path = write_nemo(tmp_path / "gpt.nemo", gpt_config(tp=2), [gpt_shard(64, 128, 2)])  # rank 1 absent
    with pytest.raises(CheckpointError, match="tensor_model_parallel_size=2"):
        NemoCheckpointWeights(str(path))


def test_sft_server_model_refuses_weights_of_another_model(tmp_path):
    path = write_nemo(tmp_path / "tp1.nemo", gpt_config(tp=1), [gpt_shard(64, 128, 1)])
    model = NemoCheckpointWeights(str(path))
    with pytest.raises(CheckpointError, match="sites and server must use the same base checkpoint"):
        model.load_state_dict({"foreign.weight": torch.zeros(1)})


def test_parameter_tree_nests_dotted_names():
    tree = ParameterTree({"a.b.weight": torch.ones(2, 3), "c": torch.zeros(4)})
    assert {k: tuple(v.shape) for k, v in tree.state_dict().items()} == {"a.b.weight": (2, 3), "c": (4,)}
