"""Trainer state per job lineage (fedllm.training.lineage) through the shared loop's CarriedState, without NVFlare."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from fedllm.flare.fedavg import LINEAGE_META
from fedllm.training.core import CarriedState, TrainerStateTask, TrainOutcome, run_round
from fedllm.training.lineage import KEEP_SNAPSHOTS, MARKER, LineageState, RoundContext

ROUNDS = 4


class AdamTask:
    """One weight fitted by Adam with a decaying LR: its moments and schedule are state that rounds carry."""

    def __init__(self) -> None:
        self.weight = torch.zeros(1, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weight], lr=0.1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1 + step))
        self.x = torch.linspace(-1, 1, 16)
        self.lrs: list[float] = []

    def exchanged_state(self):
        return {"weight": self.weight}

    def load_exchanged_state(self, state):
        with torch.no_grad():
            self.weight.copy_(state["weight"])

    def train(self, epochs, seed):
        noise = torch.Generator().manual_seed(seed)  # the round's draw: the same when a continuation redoes it
        for _ in range(5):
            self.optimizer.zero_grad()
            target = 3 * self.x + 0.1 * torch.randn(16, generator=noise)
            loss = ((self.weight * self.x - target) ** 2).mean()
            loss.backward()
            self.lrs.append(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            self.schedule.step()
        return TrainOutcome(steps=5, train_loss=float(loss.detach()))

    def evaluate(self):
        return {"val_loss": float(((self.weight.detach() - 3) ** 2).sum())}

    def begin_round(self, context, snapshot):
        if snapshot is not None:
            saved = torch.load(snapshot / "state.pt")
            self.optimizer.load_state_dict(saved["optimizer"])
            self.schedule.load_state_dict(saved["schedule"])

    def save_round_state(self, folder):
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}, folder / "state.pt"
        )


def _rounds(task: AdamTask, carried: CarriedState, rounds: range, start: torch.Tensor) -> torch.Tensor:
    """FedAvg of one site: the global weight of round r is what the site sent in round r-1."""
    weight = start
    for r in rounds:
        context = RoundContext("job-1", r, ROUNDS)
        carried.begin(context)
        state, _, _ = run_round(task, {"weight": weight}, epochs=1, seed=1000 + r)
        carried.end(context)
        weight = state["weight"].clone()
    return weight


def test_a_continuation_redoing_an_aborted_round_trains_what_the_uninterrupted_run_trains(tmp_path: Path) -> None:
    assert isinstance(AdamTask(), TrainerStateTask)
    quiet = lambda _m: None  # noqa: E731
    whole = AdamTask()
    expected = _rounds(whole, CarriedState(whole, tmp_path / "a", quiet), range(ROUNDS), torch.zeros(1))

    # The interrupted run: rounds 0-2 trained (2's snapshot written), but the server only checkpointed round 1.
    first = AdamTask()
    after_round_1 = _rounds(first, CarriedState(first, tmp_path / "b", quiet), range(2), torch.zeros(1))
    _rounds(first, CarriedState(first, tmp_path / "b", quiet), range(2, 3), after_round_1)
    assert set(LineageState(tmp_path / "b", "job-1").snapshots()) == {0, 1, 2}
    # The continuation: a new process from round 1's global model, redoing round 2 from round 1's state.
    said: list[str] = []
    again = AdamTask()
    got = _rounds(again, CarriedState(again, tmp_path / "b", said.append), range(2, ROUNDS), after_round_1)
    assert torch.equal(got, expected)
    assert again.lrs == whole.lrs[10:], "the LR schedule went on, it did not restart"
    assert any("round 2 goes on from the trainer state in" in line and "round-1" in line for line in said)

    # Without the snapshot (a site whose disk was wiped) it starts afresh, and says so.
    wiped = AdamTask()
    said.clear()
    differs = _rounds(wiped, CarriedState(wiped, tmp_path / "c", said.append), range(2, ROUNDS), after_round_1)
    assert not torch.equal(differs, expected) and "starts a fresh optimizer" in said[0]


def test_snapshots_kept_are_those_a_continuation_can_need_and_none_after_the_final_evaluation(tmp_path: Path) -> None:
    task = AdamTask()
    carried = CarriedState(task, tmp_path, lambda _m: None)
    state = LineageState(tmp_path, "job-1")
    for r in range(ROUNDS):
        context = RoundContext("job-1", r, ROUNDS)
        carried.begin(context)
        assert set(state.snapshots()) == {k for k in range(r - 2, r) if k >= 0}
        run_round(task, {"weight": torch.zeros(1)}, epochs=1, seed=r)
        carried.end(context)
        assert len(state.snapshots()) <= KEEP_SNAPSHOTS
    # A redo of the last round (the server died before its checkpoint) needs these; nothing needs the last one's.
    assert set(state.snapshots()) == {ROUNDS - 3, ROUNDS - 2}
    carried.finish()  # the final global model's evaluation: every checkpoint of the server is on disk
    assert not state.folder.exists()

    one_round = CarriedState(task, tmp_path / "local", lambda _m: None)
    one_round.begin(RoundContext("job-2", 0, 1))
    run_round(task, {"weight": torch.zeros(1)}, epochs=1, seed=0)
    one_round.end(RoundContext("job-2", 0, 1))
    assert not (tmp_path / "local" / "job-2").exists(), "a 1-round job keeps no state"


def test_a_snapshot_counts_only_with_its_marker_and_an_aborted_runs_later_rounds_go(tmp_path: Path) -> None:
    state = LineageState(tmp_path, "job-1")
    for r, marked in ((0, True), (1, True), (2, True), (3, False)):
        folder = state.folder_for(r)
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x")
        if marked:
            state.mark(folder, r)
    assert set(state.snapshots()) == {0, 1, 2}  # round 3 was cut short: no marker
    (state.folder_for(9)).mkdir()
    (state.folder_for(9) / MARKER).write_text(json.dumps({"lineage": "another", "round": 9}))
    assert 9 not in state.snapshots()
    gone = state.begin_round(2)  # round 2 is redone: its old snapshot and anything unmarked go
    assert set(state.snapshots()) == {0, 1} and state.folder_for(2) in gone and state.folder_for(3) in gone


def test_round_context_of_a_task_and_of_a_server_that_sends_no_lineage() -> None:
    task = SimpleNamespace(meta={LINEAGE_META: "first"}, current_round=5, total_rounds=8)
    assert RoundContext.of_task(task, "this-job") == RoundContext("first", 5, 8)
    assert not RoundContext.of_task(task, "this-job").is_last
    plain = SimpleNamespace(meta={}, current_round=2, total_rounds=None)
    assert RoundContext.of_task(plain, "this-job") == RoundContext("this-job", 2, 3)
    assert LineageState(Path("/s"), "../x").folder == Path("/s/.._x")
    assert LineageState(Path("/s"), "..").folder == Path("/s/_")


def test_a_finished_lineage_keeps_only_a_dp_sites_privacy_ledger(tmp_path: Path) -> None:
    from fedllm.training.dp import LEDGER_NAME, DPSettings, PrivacyLedger

    state = LineageState(tmp_path, "job-1")
    snapshot = state.folder / "checkpoint-8"
    snapshot.mkdir(parents=True)
    state.mark(snapshot, 0)
    ledger = PrivacyLedger()
    ledger.record(DPSettings(delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.125), 8, 0)
    ledger.save(state.folder / LEDGER_NAME)
    state.finish()
    assert [p.name for p in state.folder.iterdir()] == [LEDGER_NAME]  # the record of the privacy it spent
    assert PrivacyLedger.load(state.folder / LEDGER_NAME).steps_total == 8
