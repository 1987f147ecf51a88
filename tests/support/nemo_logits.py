"""Logits of a .nemo as NeMo itself restores and runs it, at the checkpoint's own tensor parallelism.

    python -m tests.support.nemo_logits MODEL.nemo OUT.pt                      (TP 1)
    torchrun --standalone --nproc_per_node=2 -m tests.support.nemo_logits MODEL_TP2.nemo OUT.pt

Rank 0 writes the full-vocabulary logits (gathered across tensor-parallel ranks) of fixed tokens to OUT.pt.
"""

from __future__ import annotations

import sys

TOKENS = [[5, 17, 42, 99, 7, 3, 250, 31]]


def main(argv: list[str] | None = None) -> None:
    model_path, out = (argv or sys.argv[1:])[:2]
    import torch
    from omegaconf import OmegaConf

    from fedllm.checkpoint.archive import read_header
    from fedllm.training.nemo.config import TrainerSettings, trainer_config
    from fedllm.training.nemo.site import build_trainer, start_nemo

    start_nemo(log=lambda _m: None)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

    header = read_header(model_path)
    tp = 1 if header.distributed else int(header.config.get("tensor_model_parallel_size", 1))
    settings = TrainerSettings(devices=tp, accelerator="cpu", precision=32, max_steps=1)
    cfg = OmegaConf.create({"trainer": trainer_config(settings), "model": {"gradient_as_bucket_view": False}})
    trainer = build_trainer(cfg, tp)
    model = MegatronGPTModel.restore_from(model_path, trainer=trainer, save_restore_connector=NLPSaveRestoreConnector())
    model.eval()
    tokens = torch.tensor(TOKENS)
    positions = torch.arange(tokens.shape[1])[None]
    mask = torch.tril(torch.ones(1, 1, tokens.shape[1], tokens.shape[1])) < 0.5
    with torch.no_grad():
        logits = model.model(tokens, positions, mask)
        if tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
    if trainer.global_rank == 0:
        torch.save({"tokens": tokens, "logits": logits.float()}, out)


if __name__ == "__main__":
    main()
