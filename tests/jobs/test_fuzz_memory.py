"""Fuzzing `model_size` (issue 28's rule for readers of user files): a damaged config.json, safetensors file or
index, or model_config.yaml gives a size, None, or fedllm's own error naming the file — never a traceback —
and any size it gives can be estimated."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from fedllm.config.memory import Workload, estimate
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.memory import model_size
from tests.jobs.test_memory import GPT2, LLAMA
from tests.support.cli_fuzz import FUZZ_SETTINGS, corrupted, json_values

NEMO_CONFIG = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer"},
}


def _sharded_llama() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)).save_pretrained(tmp, max_shard_size="100KB")
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


SHARDED = _sharded_llama()


def _check(folder: Path) -> None:
    try:
        size = model_size(str(folder))
    except JobSpecError as exc:
        assert str(exc).startswith("--model") and str(folder) in str(exc)
        return
    if size is not None:
        for method in ("full", "lora", "qlora", "ptuning"):
            assert estimate(size, Workload(method)).total > 0  # type: ignore[arg-type]


@FUZZ_SETTINGS
@given(st.data())
def test_damaged_config_json_or_field_values(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = data.draw(st.sampled_from([GPT2, LLAMA]))
        if data.draw(st.booleans()):
            text = data.draw(corrupted(json.dumps(base).encode()))
        else:
            key = data.draw(st.sampled_from(sorted(base)))
            text = json.dumps({**base, key: data.draw(json_values())}).encode()
        (folder / "config.json").write_bytes(text)
        _check(folder)


@FUZZ_SETTINGS
@given(st.data())
def test_damaged_safetensors_shards_and_index(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, content in SHARDED.items():
            (folder / name).write_bytes(content)
        victim = data.draw(st.sampled_from(sorted(n for n in SHARDED if n != "config.json")))
        if data.draw(st.booleans()):
            (folder / victim).unlink()  # a shard or the index missing
            victim = data.draw(st.sampled_from(sorted(n for n in SHARDED if n != "config.json" and n != victim)))
        # Damage the first bytes most of the time: that is where a safetensors header and an index's fields live.
        head = SHARDED[victim][:4096]
        (folder / victim).write_bytes(data.draw(corrupted(head)) + SHARDED[victim][4096:])
        _check(folder)


@FUZZ_SETTINGS
@given(st.data())
def test_damaged_nemo_model_config(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m.nemo"
        folder.mkdir()
        if data.draw(st.booleans()):
            text = data.draw(corrupted(yaml.safe_dump(NEMO_CONFIG).encode()))
        else:
            key = data.draw(st.sampled_from([*NEMO_CONFIG, "ffn_hidden_size", "vocab_size", "bias", "normalization"]))
            text = yaml.safe_dump({**NEMO_CONFIG, key: data.draw(json_values())}).encode()
        (folder / "model_config.yaml").write_bytes(text)
        _check(folder)
        shutil.rmtree(folder)
