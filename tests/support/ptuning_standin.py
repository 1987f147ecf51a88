"""A CPU stand-in for the NeMo p-tuning task, for the launch-path test (no NeMo, no GPU).

It is NOT the NeMo trainer: it trains fedllm's PromptEncoderWeights toward a fixed target so the
test can check everything around NeMo for real — torchrun with one process per "GPU" started by
NVFlare's Client API (external process), rank 0 in the shared loop and rank 1 following over
torch.distributed (gloo), and the prompt-encoder keys the server's initial model and the sites share.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from fedllm.flare.server_models import PromptEncoderWeights
from fedllm.training.core import TrainOutcome, run_site
from fedllm.training.distributed import run_distributed_site
from fedllm.training.nemo.prompt_encoder import load_prompt_encoder_state, prompt_encoder_state


class StandinPtuningTask:
    def __init__(self, token_dim: int, encoder_hidden: int):
        torch.manual_seed(dist.get_rank())  # ranks start different; loading the global state aligns them
        self.encoder = PromptEncoderWeights(10, token_dim, encoder_hidden)
        self.target = torch.ones(10, token_dim)

    def load_exchanged_state(self, state):
        load_prompt_encoder_state(self.encoder, state)

    def exchanged_state(self):
        return prompt_encoder_state(self.encoder)

    def _loss(self):
        return torch.nn.functional.mse_loss(self.encoder(), self.target)

    def train(self, epochs, seed):
        opt = torch.optim.SGD(self.encoder.parameters(), lr=0.05)
        for _ in range(epochs * 20):
            opt.zero_grad()
            loss = self._loss()
            loss.backward()
            for p in self.encoder.parameters():  # replicated across ranks, as NeMo's "mlp" encoder on TP ranks
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
            opt.step()
        return TrainOutcome(steps=epochs * 20, train_loss=float(loss))

    def evaluate(self):
        with torch.no_grad():
            loss = self._loss()
        both = torch.stack([loss, torch.tensor(float(dist.get_rank()))])
        gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, both)
        # Ranks hold the same encoder after loading the global state: their losses agree.
        spread = max(float(g[0]) for g in gathered) - min(float(g[0]) for g in gathered)
        return {"val_loss": float(loss), "rank_loss_spread": spread, "ranks": float(len(gathered))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--token-dim", type=int, default=16)
    p.add_argument("--encoder-hidden", type=int, default=8)
    args, _ = p.parse_known_args(argv)
    dist.init_process_group("gloo")  # NeMo's Lightning strategy does this on a GPU site
    run_distributed_site(
        lambda site: StandinPtuningTask(args.token_dim, args.encoder_hidden),
        run_site,
        site="site-1",
        epochs=args.epochs,
        seed=0,
    )
    dist.destroy_process_group()
