"""A site's trainer state between rounds, kept per job lineage so that a continuation job goes on with it.

A FedAvg job that the server continues after a restart (fedllm.flare.resume) is a new NVFlare job with a
new id, and its sites start new trainer processes. What a trainer carries from one round to the next
(optimizer moments, the LR schedule's position, the loss scaler, where it is in its data) must outlive
both, so it is kept per *lineage*: the id of the job as first submitted, which every continuation
inherits and `LeanFedAvg` sends with each train task (`LINEAGE_META`), under

    <site workspace>/fedllm-state/<lineage>/

as one snapshot per round: the state at the end of round r, complete once its `fedllm_round.json`
(written last, fsynced with everything before it) is there. A round that a server restart interrupts
was trained by the sites but never aggregated; the continuation redoes it from the last global
checkpoint, so its sites must start from the end of the round *before* it, not from what the aborted
round left. Hence round r starts from snapshot r-1, which a trainer process loads only in its first
round (later rounds go on from its memory, where the same state is), and snapshots of round r or later
found at its start are an aborted run's and go.

How many are kept: when the server sends round r's task its checkpoint of round r-2 is on disk (its
writer keeps at most two writes in flight, fedllm.flare.fedavg.CheckpointWriter), so a continuation
never starts before round r-1 and needs no snapshot before r-2. At the start of round r the site keeps
r-2 and r-1, and after training it adds r: at most `KEEP_SNAPSHOTS` = 3 on disk. The last round's own
snapshot is never needed and goes at once; the folder goes (all but a DP site's privacy ledger, which
stays) when the site receives the final global model's evaluation after the last round (the server
sends it once every checkpoint is on disk), or at once for a 1-round job. A job that ends otherwise
(aborted, failed, or continued with no round left to train) leaves its folder behind.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.fileio import fsync_path, write_text
from fedllm.flare.fedavg import LINEAGE_META
from fedllm.training.dp import LEDGER_NAME

STATE_ROOT = "fedllm-state"  # beside the job folders in the site's workspace
MARKER = "fedllm_round.json"
KEEP_SNAPSHOTS = 3


@dataclass(frozen=True)
class RoundContext:
    """Where a train task stands in its lineage: which lineage, which round (counted from the first job), of how many."""

    lineage: str
    round: int
    total_rounds: int

    @classmethod
    def of_task(cls, model: Any, job_id: str) -> RoundContext:
        """From a received FLModel; a server that sends no lineage (not LeanFedAvg) makes the job its own lineage."""
        meta = getattr(model, "meta", None) or {}
        current = int(getattr(model, "current_round", None) or 0)
        total = getattr(model, "total_rounds", None)
        return cls(str(meta.get(LINEAGE_META) or job_id), current, int(total) if total else current + 1)

    @property
    def is_last(self) -> bool:
        return self.round >= self.total_rounds - 1


def safe_name(lineage: str) -> str:
    """A folder name for a lineage id (NVFlare's are UUIDs; anything else is made harmless)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", lineage)
    return name if name.strip(".") else "_"  # never "", "." or ".."


class LineageState:
    """The snapshots of one lineage on one site: `<root>/<lineage>/<snapshot folder>/` each with a round marker."""

    def __init__(self, root: Path, lineage: str):
        self.lineage = lineage
        self.folder = root / safe_name(lineage)

    def snapshots(self) -> dict[int, Path]:
        """Complete snapshots by round (a folder without its marker was cut short and does not count)."""
        found: dict[int, Path] = {}
        if not self.folder.is_dir():
            return found
        for marker in self.folder.glob(f"*/{MARKER}"):
            try:
                record = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if (
                isinstance(record, Mapping)
                and record.get("lineage") == self.lineage
                and isinstance(record.get("round"), int)
            ):
                found[record["round"]] = marker.parent
        return found

    def snapshot(self, round_: int) -> Path | None:
        """The state at the end of `round_`, if it is on disk and complete."""
        return self.snapshots().get(round_)

    def begin_round(self, round_: int) -> list[Path]:
        """Before training `round_`: drop what no continuation can need. Returns what went.

        That is every snapshot from round `round_` on (an aborted run's: this round is being redone),
        snapshots older than `round_` - (KEEP_SNAPSHOTS - 1), and folders without a marker (cut short).
        """
        if not self.folder.is_dir():
            return []
        keep = {r: p for r, p in self.snapshots().items() if round_ - (KEEP_SNAPSHOTS - 1) <= r < round_}
        kept = set(keep.values())
        gone = [p for p in self.folder.iterdir() if p.is_dir() and p not in kept]
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        return gone

    def folder_for(self, round_: int) -> Path:
        """Where a trainer that names its own snapshot folders (not HF's checkpoint-N) writes round `round_`."""
        return self.folder / f"round-{round_}"

    def mark(self, snapshot: Path, round_: int) -> None:
        """Make `snapshot` count as round `round_`'s: its files fsynced, then the marker written durably."""
        for path in sorted(snapshot.rglob("*"), reverse=True):
            fsync_path(path)
        fsync_path(snapshot)
        write_text(snapshot / MARKER, json.dumps({"lineage": self.lineage, "round": round_}) + "\n", durable=True)

    def after_last_round(self, round_: int) -> None:
        """The lineage's last round is trained: its own snapshot is never needed (no round follows it); those
        a redo of it could need stay until `finish` (a 1-round job keeps none)."""
        self.begin_round(round_)
        if not self.snapshots():
            self.finish()

    def finish(self) -> None:
        """The lineage is over here: nothing of it is needed any more but a DP site's privacy ledger
        (fedllm.training.dp), the record of the privacy it spent, which stays for its privacy officer."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name == LEDGER_NAME and path.is_file():
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def state_root(job_folder: Path) -> Path:
    """`fedllm-state` beside the site's job folders (`job_folder` is one of them, fedllm.training.core.job_folder)."""
    return job_folder.parent / STATE_ROOT
