"""Rounds of a real NeMo site task without NVFlare, as the shared loop drives them (a process of its own, under torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 1 -m tests.support.nemo_rounds \\
        KIND MODEL DATA_DIR WORK FIRST_ROUND ROUNDS

KIND is ptuning or sft. Rounds FIRST_ROUND..ROUNDS-1 run through fedllm.training.core.CarriedState with
the trainer state under WORK/state; round r > 0 loads, as its global model, the exchanged state that
round r-1 sent (WORK/sent-<r-1>.pt, written by the run that trained it), so a run started at a later
round is a continuation of an earlier run. Every optimizer step's LR, Adam step count and training loss
go to WORK/steps-<FIRST_ROUND>.json, what each round sends to WORK/sent-<r>.pt (first run only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(kind: str, model: str, data: Path, work: Path, first: int, rounds: int) -> None:
    from lightning.pytorch import Callback

    from fedllm.training.core import CarriedState, run_round
    from fedllm.training.lineage import RoundContext
    from fedllm.training.nemo.site import preflight
    from fedllm.training.nemo.trainer_state import optimizer_steps

    common = ["--model", model, "--devices", "1", "--global-batch-size", "8", "--micro-batch-size", "4"]
    common += ["--max-seq-length", "128", "--num-workers", "0"]
    if kind == "ptuning":
        from fedllm.training.nemo.ptuning import NemoPtuningTask as Task
        from fedllm.training.nemo.ptuning import parse_args

        argv = ["--train", str(data / "site-1" / "train.jsonl"), "--val", str(data / "val.jsonl")]
        argv += ["--encoder-hidden", "32", "--virtual-tokens", "4", "--lr", "0.02"]
    else:
        from fedllm.training.nemo.sft import NemoSftTask as Task
        from fedllm.training.nemo.sft import parse_args

        argv = ["--train", str(data / "site-1" / "training.jsonl"), "--val", str(data / "site-1" / "validation.jsonl")]
        argv += ["--lr", "0.001", "--rounds", str(rounds)]
    args = parse_args([*common, *argv])
    task = Task(args, "site-1", preflight(args, "site-1"))
    steps: list[dict] = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, *_):
            optimizer = trainer.optimizers[0]
            loss = trainer.callback_metrics.get("reduced_train_loss")
            steps.append(
                {
                    "lr": optimizer.param_groups[0]["lr"],  # what the next step uses (the scheduler has stepped)
                    "adam_step": optimizer_steps(optimizer.state_dict()),
                    "loss": float(loss) if loss is not None else None,
                }
            )

    task.trainer.callbacks.append(Steps())
    carried = CarriedState(task, work / "state", print)
    for r in range(first, rounds):
        context = RoundContext("lineage", r, rounds)
        carried.begin(context)
        incoming = torch.load(work / f"sent-{r - 1}.pt") if r > 0 else task.exchanged_state()
        sent, _, _ = run_round(task, incoming, epochs=1, seed=1234 * 1000 + r)
        carried.end(context)
        if first == 0:
            torch.save(sent, work / f"sent-{r}.pt")
        else:
            torch.save(sent, work / f"resent-{r}.pt")
    (work / f"steps-{first}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    kind, model, data, work, first, rounds = sys.argv[1:7]
    main(kind, model, Path(data), Path(work), int(first), int(rounds))
