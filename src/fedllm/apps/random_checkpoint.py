"""Make a Megatron-GPT `.nemo` with random weights, built and saved by NeMo itself (no downloads).

Machines that run fedllm's NeMo checks cannot reach NGC or the HF Hub, so their base model is built where
it runs: a SentencePiece tokenizer trained on the site's own text (the FPB sentences) and NeMo's
MegatronGPTModel initialised at random and saved with NeMo's own `save_to`. The GPU proof uses the 345M
shapes (24 layers, hidden 1024, 16 heads, ffn 4096; the vocabulary is the small tokenizer's, not GPT-2's);
CI uses a tiny model on CPU (`--shape tiny`). It shows that training runs through a real server and site —
not what a pretrained model would learn.

`--layout legacy` (the default) is the layout of NVIDIA's public nemo-megatron-gpt checkpoints (per-rank
`model_weights.ckpt`); `--layout mcore` is a Megatron-core GPT, which NeMo 2 saves as a distributed checkpoint.

    python -m fedllm.apps.random_checkpoint --text data/site-1/train.jsonl --out /models/gpt345m_random.nemo
    python -m fedllm.apps.random_checkpoint --text train.jsonl --out tiny.nemo --shape tiny    # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedllm.training.nemo.config import optimizer_name, trainer_config
from fedllm.training.nemo.site import build_trainer, machine_trainer_settings, start_nemo

SHAPES = {
    # Megatron-GPT 345M (nvidia/megatron_gpt_345m): 24 layers, hidden 1024, 16 heads, ffn 4 × hidden.
    "345m": {"num_layers": 24, "hidden_size": 1024, "ffn_hidden_size": 4096, "num_attention_heads": 16},
    # Small enough that a CPU trains it in a second per round (CI).
    "tiny": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4},
}


def gpt_model_config(
    tokenizer_model: str,
    *,
    tensor_parallel: int = 1,
    seq_length: int = 1024,
    mcore: bool = False,
    gpu: bool = True,
    **shape: int,
) -> dict[str, Any]:
    """MegatronGPTModel's config for a fresh model; without a GPU, fp32 and the local (non-TE) layer spec."""
    dims = {**SHAPES["345m"], **shape}
    return {
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": 1,
        "encoder_seq_length": seq_length,
        "max_position_embeddings": seq_length,
        **dims,
        "init_method_std": 0.02,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "kv_channels": None,
        "apply_query_key_layer_scaling": gpu,
        "layernorm_epsilon": 1e-5,
        "make_vocab_size_divisible_by": 128 if gpu else 64,
        "persist_layer_norm": gpu,
        "bias": True,
        "activation": "gelu",
        "normalization": "layernorm",
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": True,
        "mcore_gpt": mcore,
        "transformer_engine": False,
        "precision": "bf16-mixed" if gpu else 32,
        "megatron_amp_O2": False,
        "gradient_as_bucket_view": True,
        "sequence_parallel": False,
        "masked_softmax_fusion": gpu,
        "bias_activation_fusion": gpu,
        "bias_dropout_add_fusion": gpu,
        "gradient_accumulation_fusion": False,
        "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None,
        "activations_checkpoint_num_layers": None,
        "activations_checkpoint_layers_per_pipeline": None,
        "seed": 1234,
        "use_cpu_initialization": not gpu,
        "tokenizer": {
            "library": "sentencepiece",
            "type": None,
            "model": tokenizer_model,
            "vocab_file": None,
            "merge_file": None,
            "sentencepiece_legacy": False,
            "additional_special_tokens": None,
        },
        # Not trained here: saving needs no data, but NeMo's constructor reads these.
        "data": {
            "data_prefix": None,
            "index_mapping_dir": None,
            "num_workers": 0,
            "dataloader_type": "single",
            "seq_length": seq_length,
            "splits_string": "900,50,50",
        },
        "optim": {"name": optimizer_name(), "lr": 1e-4},
    }


def _sentences(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out.append(" ".join(str(v) for k, v in record.items() if k != "taskname"))
    return out


def train_tokenizer(text_jsonl: Path, out_dir: Path, vocab_size: int = 4000) -> Path:
    """A SentencePiece model (what NeMo's sentencepiece tokenizer loads) trained on the given records."""
    import sentencepiece as spm

    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(_sentences(text_jsonl)) + "\n", encoding="utf-8")
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_id=0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, required=True, help="JSONL records to train the tokenizer on")
    p.add_argument("--out", type=Path, required=True, help="the .nemo to write")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel (run under torchrun with as many processes)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="345m")
    p.add_argument("--layout", choices=("legacy", "mcore"), default="legacy")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    import torch

    start_nemo()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from omegaconf import OmegaConf

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(args.text, Path(tmp), args.vocab_size)
        model_cfg = gpt_model_config(
            str(tokenizer), tensor_parallel=args.tp, seq_length=args.seq_length, mcore=args.layout == "mcore",
            gpu=gpu, **SHAPES[args.shape],
        )  # fmt: skip
        model_cfg["seed"] = args.seed
        settings = machine_trainer_settings(args.tp, "bf16-mixed", max_steps=1)
        cfg = OmegaConf.create({"trainer": trainer_config(settings), "model": model_cfg})
        trainer = build_trainer(cfg, 1)  # a fresh model: no .nemo shards to place in AppState
        model = MegatronGPTModel(cfg.model, trainer=trainer)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(f".{args.out.name}.partial")
        model.save_to(str(partial))  # NeMo packs config, weights and the tokenizer model
        if trainer.global_rank == 0:
            partial.replace(args.out)
            n = sum(p.numel() for p in model.parameters())
            print(f"wrote {args.out}: {n / 1e6:.2f} M parameters, {args.layout} layout, TP {args.tp}")


if __name__ == "__main__":  # save_to of a distributed checkpoint starts processes that re-import this module
    main()
