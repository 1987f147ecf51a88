""".nemo inspection, the TP ≠ GPUs error, the NeMo version guard, and which tensors leave a site."""

from __future__ import annotations

import pytest
import torch

from fedllm.nemo.checkpoint import check_fits_site, read_model_config
from fedllm.nemo.compat import require_nemo_nlp
from fedllm.nemo.errors import NemoCheckpointError, NemoStateError, NemoUnavailableError
from fedllm.nemo.prompt_encoder import PromptEncoderWeights, load_prompt_encoder_state, prompt_encoder_state
from fedllm.nemo.server_models import NemoCheckpointWeights, split_shard_key
from tests.nemo.conftest import gpt_config, gpt_shard, write_nemo


def test_reads_tp_and_hidden_size_from_the_archive(tmp_path):
    path = write_nemo(tmp_path / "gpt.nemo", gpt_config(tp=2, hidden=96), [gpt_shard(96, 128, 2)] * 2)
    info = read_model_config(path)
    assert (info.tensor_parallel, info.pipeline_parallel, info.hidden_size) == (2, 1, 96)
    check_fits_site(info, devices=2)


def test_tp_not_equal_to_site_gpus_names_file_field_and_fix(tmp_path):
    path = write_nemo(tmp_path / "gpt20b_tp4.nemo", gpt_config(tp=4), [])
    with pytest.raises(NemoCheckpointError) as err:
        check_fits_site(read_model_config(path), devices=2)
    msg = str(err.value)
    assert "gpt20b_tp4.nemo" in msg and "model_config.yaml field tensor_model_parallel_size is 4" in msg
    assert "--devices 4" in msg and "target_tensor_model_parallel_size" in msg


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(NemoCheckpointError, match="does not exist on this machine"):
        read_model_config(tmp_path / "nope.nemo")
    (tmp_path / "x.nemo").write_text("not a tar")
    with pytest.raises(NemoCheckpointError, match=r"not a readable \.nemo archive"):
        read_model_config(tmp_path / "x.nemo")


def test_nemo_version_guard_messages():
    with pytest.raises(NemoUnavailableError, match="cannot read the NeMo version"):
        require_nemo_nlp("", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"2\.5\.3 is installed.*>=1\.23,<2\.5"):
        require_nemo_nlp("2.5.3", nlp_present=False)
    with pytest.raises(NemoUnavailableError, match=r"1\.22\.0"):
        require_nemo_nlp("1.22.0", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"without nemo\.collections\.nlp"):
        require_nemo_nlp("2.4.0", nlp_present=False)
    assert require_nemo_nlp("2.0.0rc1", nlp_present=True) == "2.0.0rc1"


def test_nemo_absent_in_this_environment_is_reported():
    pytest.importorskip("torch")
    try:
        import nemo  # noqa: F401
    except ImportError:
        with pytest.raises(NemoUnavailableError, match="not installed"):
            require_nemo_nlp()
    else:
        pytest.skip("NeMo is installed here")


def test_only_the_trained_prompt_encoder_leaves_a_site():
    server = PromptEncoderWeights(total_virtual_tokens=10, token_dim=1024, encoder_hidden=2048)
    state = prompt_encoder_state(server)
    assert set(state) == {
        "embedding.weight",
        "mlp_head.0.weight",
        "mlp_head.0.bias",
        "mlp_head.2.weight",
        "mlp_head.2.bias",
    }
    assert state["embedding.weight"].shape == (10, 1024) and state["mlp_head.2.weight"].shape == (1024, 2048)
    # 10·1024 + 1024·2048 + 2048 + 2048·1024 + 1024 ≈ 4.2 M floats: 17 MB per round, not the 345M LLM.
    assert sum(t.numel() for t in state.values()) == 10 * 1024 + 2 * 1024 * 2048 + 2048 + 1024


def test_loading_the_global_state_copies_and_rejects_mismatches():
    a, b = PromptEncoderWeights(token_dim=32, encoder_hidden=16), PromptEncoderWeights(token_dim=32, encoder_hidden=16)
    load_prompt_encoder_state(b, prompt_encoder_state(a))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(NemoStateError, match=r"shape mismatches.*mlp_head\.0\.weight"):
        load_prompt_encoder_state(b, prompt_encoder_state(PromptEncoderWeights(token_dim=32, encoder_hidden=8)))
    with pytest.raises(NemoStateError, match=r"missing \[.embedding\.weight.\]"):
        load_prompt_encoder_state(b, {k: v for k, v in prompt_encoder_state(a).items() if k != "embedding.weight"})


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
