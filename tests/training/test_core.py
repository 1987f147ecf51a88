"""The shared training loop, without NVFlare: what one round sends and reports."""

from __future__ import annotations

import numpy as np
import torch

from fedllm.training.core import TrainOutcome, as_tensors, run_round, state_bytes


class LinearTask:
    """y = 2x learned by one weight; the 'frozen' bias never leaves the site."""

    def __init__(self) -> None:
        self.weight = torch.zeros(1, requires_grad=True)
        self.frozen_bias = torch.ones(3)
        self.x = torch.linspace(-1, 1, 32)

    def exchanged_state(self):
        return {"weight": self.weight}

    def load_exchanged_state(self, state):
        with torch.no_grad():
            self.weight.copy_(state["weight"])

    def _loss(self):
        return ((self.weight * self.x - 2 * self.x) ** 2).mean()

    def train(self, epochs, seed):
        opt = torch.optim.SGD([self.weight], lr=0.5)
        for _ in range(epochs * 10):
            opt.zero_grad()
            loss = self._loss()
            loss.backward()
            opt.step()
        return TrainOutcome(steps=epochs * 10, train_loss=float(loss.detach()))

    def evaluate(self):
        with torch.no_grad():
            return {"val_loss": float(self._loss())}


def test_round_sends_only_the_exchanged_state_and_reports_global_and_local_metrics() -> None:
    state, metrics, steps = run_round(LinearTask(), {"weight": np.zeros(1, dtype=np.float32)}, epochs=2, seed=0)
    assert list(state) == ["weight"] and steps == 20
    assert abs(state["weight"].item() - 2.0) < 1e-2
    assert metrics["global_val_loss"] > 1.0 > 1e-3 > metrics["val_loss"]
    assert metrics["bytes_sent"] == 4.0
    assert {"train_loss", "round_seconds"} <= set(metrics)


def test_state_helpers_accept_numpy_and_half_precision() -> None:
    state = {"a": np.zeros((2, 3), dtype=np.float16), "b": torch.zeros(4, dtype=torch.float32)}
    assert state_bytes(state) == 2 * 3 * 2 + 4 * 4
    tensors = as_tensors(state)
    assert tensors["a"].dtype == torch.float32 and tensors["a"].shape == (2, 3)


def test_job_folder_is_the_sites_job_folder_in_process_and_under_torchrun(tmp_path, monkeypatch) -> None:
    from fedllm.training.core import job_folder

    job = tmp_path / "job-1"
    (job / "app_site-1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # in-process: the site workspace
    assert job_folder("site-1", "job-1") == job
    monkeypatch.chdir(job / "app_site-1")  # external process (torchrun): the job's app folder
    assert job_folder("site-1", "job-1") == job
    assert job_folder("site-1", "") == job / "app_site-1" / "fedllm-jobs" / "site-1"
