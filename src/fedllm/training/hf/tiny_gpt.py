"""A tiny GPT-2 with its own BPE tokenizer, pretrained briefly on CPU: a base model without hub downloads.

Built once and cached under $FEDLLM_CACHE (default ~/.cache/fedllm)/tiny-gpt-<key>, a normal
Hugging Face model folder (config.json, model.safetensors, tokenizer.json), so every trainer loads
it with `from_pretrained` exactly like a real model. Pretraining uses the synthetic corpus's
unlabeled text: the model learns the words and the "sentiment: <label>" format, not the task.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedllm.fileio import atomic_directory


@dataclass(frozen=True)
class TinyGptSpec:
    layers: int = 2
    hidden: int = 96
    heads: int = 4
    context: int = 64  # tokens; FPB-like sentences + 10 virtual tokens fit
    vocab: int = 800  # BPE vocabulary trained on the corpus
    texts: int = 3000  # pretraining texts
    steps: int = 500  # pretraining steps (batch 32): ~25 s on 2 CPU cores
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")).expanduser()


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _pretrain(model, tokenizer, texts: list[str], spec: TinyGptSpec, log) -> float:
    import torch

    torch.manual_seed(spec.seed)
    encoded = tokenizer([t + tokenizer.eos_token for t in texts], truncation=True, max_length=spec.context)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=spec.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    loss_value = float("nan")
    for step in range(spec.steps):
        idx = torch.randint(len(encoded), (32,), generator=gen).tolist()
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"      pretraining step {step + 1}/{spec.steps}: loss {loss_value:.3f}")
    model.eval()
    return loss_value


def build_tiny_gpt(spec: TinyGptSpec = TinyGptSpec(), cache: Path | None = None, log=print) -> Path:
    """Return the cached model folder, building (≈30 s) it first if it is not there."""
    target = (cache or cache_root()) / f"tiny-gpt-{spec.key()}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedllm.data.synthetic import pretraining_texts
    from fedllm.training.hf.common import quiet_transformers

    quiet_transformers()

    started = time.monotonic()
    texts = pretraining_texts(spec.texts, seed=spec.seed)
    tokenizer = _train_tokenizer(texts, spec.vocab)
    torch.manual_seed(spec.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.context,
        n_embd=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    log(f"      building tiny GPT-2 ({model.num_parameters():,} parameters) → {target}")
    loss = _pretrain(model, tokenizer, texts, spec, log)
    # Several sites (or tests) may build the same model at once: the first rename wins, the others keep it.
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "fedllm_pretraining.json").write_text(
            json.dumps({**asdict(spec), "final_loss": loss, "seconds": time.monotonic() - started}, indent=2)
        )
    return target
