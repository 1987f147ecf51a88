"""P-tuning on a Hugging Face causal LM through the federation (the seeds' NeMo p-tuning, on PEFT).

PEFT's PromptEncoder (MLP reparameterization, 10 virtual tokens by default) feeds virtual tokens
in front of "{sentence} sentiment:"; the loss scores only " {label}<eos>" (answer-only), the base
model stays frozen, and only the prompt encoder's parameters cross the wire. Accuracy is the exact
match of the greedily generated label. Job template: jobs/hf-ptuning.yaml.

    fedllm job create hf-ptuning --mode fedavg --model /models/gpt --out runs/jobs
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedllm.training.core import TrainOutcome, resolve_path, run_site
from fedllm.training.dp import DPSettings, dp_round
from fedllm.training.hf.common import (
    CausalLMTask,
    base_parser,
    batches,
    collate,
    load_records,
    pick_device,
    prompt_answer_ids,
    quiet_transformers,
)

ADAPTER = "default"
PROMPT = "{sentence} sentiment:"


def load_ptuning_model(model_path: str, num_virtual_tokens: int = 10, encoder_hidden_size: int | None = None):
    """(peft model, tokenizer): the frozen base model with a fresh MLP prompt encoder."""
    from peft import PromptEncoderConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_path)
    token_dim = base.get_input_embeddings().embedding_dim
    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=encoder_hidden_size or token_dim,
    )
    return get_peft_model(base, config), tokenizer


def macro_f1(predictions: list[str], truths: list[str], labels: list[str]) -> float:
    """Unweighted mean over `labels` of each label's F1 (scikit-learn's): a label never predicted nor true counts 0.

    `labels` fixes the classes averaged over (the training and validation sets' labels), so a class missing
    from one site's validation set still counts, and a generated word that is no label is only a miss.
    """
    from sklearn.metrics import f1_score

    if not truths or not labels:  # nothing to score: 0, as accuracy is on an empty validation set
        return 0.0
    return float(f1_score(truths, predictions, labels=labels, average="macro", zero_division=0))


def prompt_encoder(model) -> nn.Module:
    return model.prompt_encoder[ADAPTER]


class PTuningTask(CausalLMTask):
    """One site's p-tuning: the `SiteTask` the training core drives."""

    def __init__(
        self,
        model_path: str,
        train: list[dict[str, Any]],
        val: list[dict[str, Any]],
        *,
        lr: float = 5e-3,
        batch_size: int = 16,
        max_length: int = 128,
        num_virtual_tokens: int = 10,
        encoder_hidden_size: int | None = None,
        device: torch.device | None = None,
    ):
        self.device = device or torch.device("cpu")
        self.model, self.tokenizer = load_ptuning_model(model_path, num_virtual_tokens, encoder_hidden_size)
        self.model.to(self.device)
        # The virtual tokens take positions too: keep prompt + answer within the model's context.
        context = getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        self.lr, self.batch_size, self.max_length = lr, batch_size, min(max_length, context - num_virtual_tokens)
        self.train_examples = [self._encode(r) for r in train]
        self.val_records = val
        self.val_examples = [self._encode(r) for r in val]
        self.labels = sorted({r["label"] for r in train} | {r["label"] for r in val})
        longest = max(len(self.tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in self.labels)
        self.answer_tokens = longest + 1

    def _encode(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        prompt = PROMPT.format(sentence=record["sentence"])
        return prompt_answer_ids(self.tokenizer, prompt, " " + record["label"], self.max_length)

    # ---- SiteTask -------------------------------------------------------------------------
    def train(self, epochs: int, seed: int) -> TrainOutcome:
        """One round of `epochs` with transformers' Trainer over the prompt encoder (the base stays frozen).

        A fresh AdamW and a constant LR every round: the encoder is re-initialised from the global
        weights each round, and fedllm's loop has no state of the Trainer to carry (NVFlare's HF
        integration, which would carry it, exchanges PEFT's prompt embeddings, not this encoder).
        Clipping at 1.0, fp32 on CPU and bf16/fp16 autocast on GPUs come from the Trainer.
        """
        import tempfile

        from transformers import PrinterCallback, Trainer, TrainingArguments

        from fedllm.training.hf.trainer_options import resolve_precision

        precision = resolve_precision("auto", cuda=self.device.type == "cuda")
        with tempfile.TemporaryDirectory(prefix="fedllm-ptuning-") as output_dir:
            args = TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=self.batch_size,
                num_train_epochs=epochs,
                learning_rate=self.lr,
                lr_scheduler_type="constant",
                weight_decay=0.01,  # torch's AdamW default, what this task trained with before the Trainer
                max_grad_norm=1.0,
                bf16=precision == "bf16",
                fp16=precision == "fp16",
                use_cpu=self.device.type == "cpu",
                seed=seed,
                data_seed=seed,
                report_to="none",
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_num_workers=0,
            )
            pad = self.tokenizer.pad_token_id
            trainer = Trainer(
                model=self.model,
                args=args,
                train_dataset=self.train_examples,
                data_collator=lambda examples: collate(examples, pad),
            )
            trainer.remove_callback(PrinterCallback)  # fedllm's loop logs each round's metrics itself
            outcome = trainer.train()
        return TrainOutcome(steps=outcome.global_step, train_loss=outcome.training_loss)

    def train_dp(self, settings: DPSettings, steps: int, seed: int) -> TrainOutcome:
        """A round of DP-SGD on the prompt encoder (fedllm.training.dp), in fedllm's own loop, not the Trainer.

        The Trainer's loss is the mean over every answer token of the batch, so one record's share of the gradient
        depends on the others' lengths; here each record's loss is the mean over its own answer tokens and the
        batch's loss the mean over its records, so a record's gradient is its own (what per-sample clipping
        bounds). PEFT (≥ 0.13, peft#2043) runs the encoder on one row of virtual tokens and repeats its output over
        the batch, so Opacus' hooks would see one "sample" whose gradient is the whole batch's: clipping would
        bound the batch, not a record. For the round the encoder runs on one row per record instead
        (`_per_record_prompts`: the same prompts, the same summed gradient, per-record activations). The model
        is on its device (the constructor) before the hooks attach (opacus#820). AdamW (decay 0.01) and the
        template's LR, as without DP; no clipping after the noise.
        """
        encoder = prompt_encoder(self.model)
        self.model.train()
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=self.lr,
                                      weight_decay=0.01)  # fmt: skip

        def batch_loss(indices: list[int]) -> torch.Tensor:
            batch = self._batch([self.train_examples[i] for i in indices])
            labels = batch.pop("labels")
            logits = self.model(**batch).logits
            logits = logits[:, logits.shape[1] - labels.shape[1] :]  # drop the virtual tokens' positions
            token_loss = nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none"
            )
            scored = (labels[:, 1:] != -100).float()
            per_record = (token_loss * scored).sum(1) / scored.sum(1).clamp(min=1)
            return per_record.mean()

        with self._per_record_prompts():
            outcome = dp_round(encoder, optimizer, batch_loss, num_records=len(self.train_examples),
                               settings=settings, steps=steps)  # fmt: skip
        return TrainOutcome(steps=outcome.steps, train_loss=outcome.mean_loss)

    @contextmanager
    def _per_record_prompts(self) -> Iterator[None]:
        """PEFT's `get_prompt` with the encoder run on the virtual tokens of every row, not on one and repeated."""
        model, encoder = self.model, prompt_encoder(self.model)

        def get_prompt(batch_size: int, task_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
            tokens = model.prompt_tokens[ADAPTER].to(encoder.embedding.weight.device)
            return encoder(tokens.unsqueeze(0).expand(batch_size, -1))

        model.get_prompt = get_prompt  # an instance attribute over PeftModel.get_prompt, for this round only
        try:
            yield
        finally:
            del model.get_prompt

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        return dict(prompt_encoder(self.model).state_dict())

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None:
        own = prompt_encoder(self.model).state_dict()
        mismatched = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        if mismatched or set(state) != set(own):
            shapes = {k: tuple(v.shape) for k, v in own.items()}
            got = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(
                f"the global prompt encoder does not fit this model: expected {shapes}, got {got}; set the job "
                "template's initial_model args (token_dim = the model's hidden size, num_virtual_tokens, "
                "encoder_hidden_size) to match --model"
            )
        prompt_encoder(self.model).load_state_dict({k: v.to(self.device) for k, v in state.items()})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, accuracy and macro-F1 (NVFlare's NeMo PEFT example on Financial PhraseBank reports both)."""
        loss = self.val_loss()
        truths = [r["label"] for r in self.val_records]
        predictions = self.predict([r["sentence"] for r in self.val_records])
        correct = sum(p == t for p, t in zip(predictions, truths, strict=True))
        return {
            "val_loss": loss,
            "val_accuracy": correct / max(1, len(truths)),
            "val_macro_f1": macro_f1(predictions, truths, self.labels),
        }

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, sentences: list[str]) -> list[str]:
        """Greedy generation after "{sentence} sentiment:"; the first generated word is the label."""
        self.model.eval()
        predictions: list[str] = []
        for idx in batches(len(sentences), self.batch_size * 4, None):
            prompts = [self._prompt_ids(sentences[i]) for i in idx]
            lengths = torch.tensor([len(p) for p in prompts])
            width = int(lengths.max()) + self.answer_tokens
            ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, : len(p)] = torch.tensor(p)
            generated = []
            # Right padding and no KV cache: position i of each row only attends to tokens before it,
            # so appending at each row's own end is exact greedy decoding, batched.
            for step in range(self.answer_tokens):
                positions = lengths + step
                mask = (torch.arange(width)[None, :] < positions[:, None]).long()
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                offset = logits.shape[1] - width  # PEFT prepends the virtual tokens' positions
                next_ids = logits[torch.arange(len(prompts)), offset + positions - 1].argmax(-1).cpu()
                ids[torch.arange(len(prompts)), positions] = next_ids
                generated.append(next_ids)
            for row in range(len(prompts)):
                tokens = [int(g[row]) for g in generated]
                if self.tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)]
                words = self.tokenizer.decode(tokens).split()
                predictions.append(words[0] if words else "")
        return predictions

    def _prompt_ids(self, sentence: str) -> list[int]:
        ids = self.tokenizer(PROMPT.format(sentence=sentence), add_special_tokens=False)["input_ids"]
        return ids[-(self.max_length - self.answer_tokens) :]


def parser():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--num-virtual-tokens", type=int, default=10)
    p.add_argument("--encoder-hidden-size", type=int, default=0, help="prompt encoder MLP width (0: model's)")
    p.add_argument("--dp", default="", help="DP-SGD settings (set by `fedllm job create --dp`)")
    return p


def argument_parser():
    """The trainer's arguments (`fedllm job create` checks a job's against them)."""
    return parser()


def build_task(args, site: str) -> PTuningTask:
    limit = args.max_val
    return PTuningTask(
        str(resolve_path(args.model, site)) if "{" in args.model else args.model,
        load_records(resolve_path(args.train, site), ("sentence", "label")),
        load_records(resolve_path(args.val, site), ("sentence", "label"), limit),
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_hidden_size=args.encoder_hidden_size or None,
        device=pick_device(args.devices, args.cpu_threads),
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    dp = DPSettings.from_arg(args.dp) if args.dp else None
    run_site(lambda site: build_task(args, site), epochs=args.epochs, seed=args.seed, tb_dir=args.tb_dir, dp=dp)
