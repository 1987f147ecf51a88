"""The server's side of a `--dp` job's privacy budget: after which round the job ends, and why.

Every site of a `--dp` job follows the same DP-SGD schedule (fedllm.training.dp: job-wide σ, q and steps per
round), so `fedllm job create` computes ε after each round and the last round within the budget, and puts both
here. `LeanFedAvg` reads this component when the job starts (and when a continuation resumes) and runs no round
past `stop_round` (counted in rounds of the job as first submitted): the job then ends as any other, with its
last global model saved, the final evaluation and status completed. No accountant runs on the server: the
numbers are the plan's, and each site's own ledger is the backstop (it refuses a round over the budget).
"""

from __future__ import annotations

from nvflare.apis.fl_component import FLComponent

COMPONENT_ID = "fedllm_dp_budget"


class DPBudget(FLComponent):
    """The plan of a `--dp` job with a budget: plain values, exported into the server's config."""

    def __init__(
        self,
        stop_round: int,
        epsilon: float,
        delta: float,
        epsilons: list[float],
        noise_multiplier: float,
        sample_rate: float,
        steps_per_round: int,
    ):
        super().__init__()
        self.stop_round = int(stop_round)  # rounds within the budget: rounds 0..stop_round-1 run
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.epsilons = [float(e) for e in epsilons]  # ε after round 1, 2, ... of the job as first submitted
        self.noise_multiplier, self.sample_rate = float(noise_multiplier), float(sample_rate)
        self.steps_per_round = int(steps_per_round)

    def last_round(self, total_rounds: int) -> int:
        """How many rounds of a job of `total_rounds` run: all of them, or those within the budget."""
        return min(total_rounds, self.stop_round)

    def reason(self, total_rounds: int) -> str:
        """Why the job ends before `total_rounds` (what the server logs)."""
        after = self.stop_round
        spent = self.epsilons[after - 1] if after else 0.0
        nxt = self.epsilons[after] if after < len(self.epsilons) else float("nan")
        return (
            f"DP budget ε={self.epsilon:g} (δ={self.delta:g}): every site has spent ε={spent:.4g} after round "
            f"{after - 1}, and round {after} would take it to ε={nxt:.4g} (σ={self.noise_multiplier:.4g}, "
            f"q={self.sample_rate:g}, {self.steps_per_round} steps a round); the job ends after round {after - 1} "
            f"of {total_rounds} with its global model"
        )
