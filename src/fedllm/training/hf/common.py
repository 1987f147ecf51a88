"""Shared pieces of the Hugging Face trainers: argument parsing, devices, batching, loading data, quiet logs."""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedllm.data.io import read_jsonl

Example = tuple[list[int], list[int]]


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every HF trainer takes (job templates pass them as --key value)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="Hugging Face model folder (or hub id where reachable)")
    parser.add_argument("--train", required=True, help="training jsonl; {data_dir} = the site's data directory")
    parser.add_argument("--val", required=True, help="validation jsonl, the same for every site")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (longer are truncated)")
    parser.add_argument("--devices", type=int, default=1, help="GPUs per site (CPU when none is visible)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tb-dir", default=None, help="TensorBoard dir (default: tb/<site> in the job workspace)")
    parser.add_argument("--max-val", type=int, default=0, help="evaluate on at most this many examples (0: all)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    return parser


def pick_device(devices: int, cpu_threads: int = 0) -> torch.device:
    """cuda:0 when a GPU is visible (the site's CUDA_VISIBLE_DEVICES picks it), else CPU with `cpu_threads`."""
    if devices > 0 and torch.cuda.is_available():
        return torch.device("cuda:0")
    if cpu_threads > 0:  # several sites sharing one machine's cores (the demo) run faster with 1 each
        torch.set_num_threads(cpu_threads)
    return torch.device("cpu")


def load_records(path: Path, required: tuple[str, ...], limit: int = 0) -> list[dict[str, Any]]:
    records = read_jsonl(path, required=required)
    return records[:limit] if limit else records


def batches(n: int, batch_size: int, seed: int | None) -> Iterator[list[int]]:
    """Index batches: shuffled (seeded) for training, in order (seed None) for evaluation."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs; padded labels are -100 so they carry no loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prompt_answer_ids(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer+eos and labels that score only the answer (answer-only loss).

    Long prompts are cut from the left so the answer always fits.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    a = a[:max_length]
    p = p[max(0, len(p) - (max_length - len(a))) :]
    return p + a, [-100] * len(p) + a


def quiet_transformers() -> None:
    """Keep logs to what matters: no per-load progress bars or deprecation chatter from transformers/PEFT."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")
    # TRL 1.x deprecates truncation_mode="keep_end" for 2.0; fedllm pins trl<2 and keeps answers whole.
    warnings.filterwarnings("ignore", message=r".*'keep_end'.* truncation mode is deprecated.*")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - the hf extra installs datasets
        pass


class CausalLMTask:
    """Validation loss and batching of p-tuning's `SiteTask` (SFT and LoRA are TRL's SFTTrainer instead).

    A subclass sets these attributes in its constructor and adds what is its own: which state is
    exchanged, how it trains, and its metrics.
    """

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    lr: float
    batch_size: int
    train_examples: list[Example]
    val_examples: list[Example]

    @torch.no_grad()
    def val_loss(self) -> float:
        """Example-weighted mean validation loss (the last batch may be smaller), in eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for idx in batches(len(self.val_examples), self.batch_size * 2, None):
            total += self.model(**self._batch([self.val_examples[i] for i in idx])).loss.item() * len(idx)
            count += len(idx)
        return total / max(1, count)

    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}
