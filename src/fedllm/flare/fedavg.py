"""A FedAvg server that holds one global model between rounds instead of two or three.

Measured in the server job of a 1 GiB echo run (docs/exchange.md): between rounds NVFlare 2.9's
stock FedAvg keeps, besides the current global model, the initial weights for the whole job (the
nn.Module that NVFlare's config builder makes from the persistor's `{"path", "args"}` model and
keeps in the parsed job config, and the persistor's own reference) and older global models (each
round's `GLOBAL_MODEL` ModelLearnable, copied into every FLContext created while it was current and
pinned by the long-lived ones); while sites download, it also deep-copies the broadcast task data
(+1× model). Three NVFlare extension points remove those copies without changing what any
component sees:

- `LeanPTFileModelPersistor`: PTFileModelPersistor named by the model's class path and arguments
  (plain values the config builder leaves alone); it builds the module at start, hands its
  weights to the controller and lets go of it. It also writes each round's checkpoint on a
  background thread (`CheckpointWriter`): torch.save + fsync of a 1 GiB model took 1.4–2.9 s of
  a ~10 s round on the server's critical path, while the sites waited for the next task.
- `LeanFedAvg`: FedAvg that keeps ONE `GLOBAL_MODEL` learnable for the job and updates it in
  place each round, so every context, old or new, sees the current model and pins no other; and
  that marks the weights it broadcasts as `SharedWeights`, whose deep copy shares the tensors.

Both also make a job survive a server or site restart (fedllm.flare.resume): every global checkpoint
carries the round it completes, and a continuation job starts from it at the next round. What
`LeanFedAvg` tells the sites with each train task lets their trainers go on as well
(fedllm.training.lineage): the job's lineage (`LINEAGE_META`) and the rounds of the job as first
submitted (`total_rounds`), next to the round's own number (`current_round`, counted from the first job).

fedllm.jobs.recipe wires the two into NVFlare's FedAvgRecipe when a job is created.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedllm.fileio import atomic_path, write_text
from fedllm.flare.dp_budget import COMPONENT_ID as DP_BUDGET_ID
from fedllm.flare.dp_budget import DPBudget
from fedllm.flare.faults import crash_point
from fedllm.flare.resume import (
    METRICS_FILE,
    PROGRESS_KEY,
    ResumeFolder,
    RoundProgress,
    completed_round_lines,
    link_or_copy,
    read_progress,
    sync_file,
)


class SharedWeights(dict):
    """The weights of one broadcast; their deep copy is a plain dict of the SAME tensors.

    NVFlare deep-copies broadcast task data (once per task, shared by all targets) so that a
    controller editing tensors in place while sites download cannot corrupt the sends.
    `LeanFedAvg` never edits a sent tensor in place (each round's global model is a new set of
    tensors from the aggregator), so the copy would only cost one more model in RAM for the length
    of the downloads. The copy is a plain dict: what goes on the wire needs no fedllm type.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> dict:
        copied = dict(self)
        memo[id(self)] = copied
        return copied


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written or read back; the job must not go on as if it were saved."""


def write_checkpoint(save_dict: dict, path: str) -> None:
    """torch.save `save_dict` to `path` atomically and durably (temp file + fsync + rename), read back first.

    The read-back maps the file (no data is read) and checks that every tensor is there with its
    shape and dtype, so a truncated or foreign file never replaces a good checkpoint silently.
    """
    with atomic_path(path, durable=True) as temp:
        with open(temp, "xb") as handle:
            torch.save(save_dict, handle)
        _verify_checkpoint(save_dict, str(temp))
        progress = save_dict.get(PROGRESS_KEY)
        crash_point("checkpoint-write", progress.get("round") if isinstance(progress, dict) else None, job_process=True)


def _verify_checkpoint(save_dict: dict, path: str) -> None:
    # Our own file, written a moment ago: the full unpickler, so metadata of any type the persistor
    # keeps (train_conf, meta) reads back as well; mmap leaves the tensor data on disk.
    written = torch.load(path, mmap=True, weights_only=False)
    for key, value in save_dict.items():
        if not isinstance(value, dict) or key not in written:
            continue
        for name, tensor in value.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            got = written[key].get(name)
            if not isinstance(got, torch.Tensor) or got.shape != tensor.shape or got.dtype != tensor.dtype:
                raise CheckpointWriteError(
                    f"{path}: {key}.{name} did not read back as {tensor.dtype}{tuple(tensor.shape)}"
                )


class CheckpointWriter:
    """Writes checkpoints on one background thread, in order, each atomically (`write_checkpoint`).

    A write holds references to the tensors of its snapshot, never copies: the controller never
    edits a global model in place (each round's model is new tensors), so a snapshot stays
    consistent while it is written. At most `max_pending` writes are in flight (a round's global
    and best checkpoints share their tensors); a caller that would exceed that waits, which bounds
    the extra memory when writing is slower than training. A failed write raises
    CheckpointWriteError from the next `submit` or from `wait`.
    """

    def __init__(self, max_pending: int = 2):
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedllm-checkpoint")
        self._pending: list[tuple[str, Future]] = []
        self._lock = threading.Lock()

    def submit(self, save_dict: dict, path: str) -> None:
        with self._lock:
            self._collect(block_until=self.max_pending - 1)
            self._pending.append((path, self._executor.submit(write_checkpoint, save_dict, path)))

    def wait(self) -> None:
        """Block until every submitted checkpoint is on disk; raise if one failed."""
        with self._lock:
            self._collect(block_until=0)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _collect(self, block_until: int) -> None:
        while self._pending and (len(self._pending) > block_until or self._pending[0][1].done()):
            path, future = self._pending.pop(0)
            try:
                future.result()
            except Exception as exc:
                self._pending.clear()
                raise CheckpointWriteError(f"writing checkpoint {path} failed: {exc}") from exc


class LeanPTFileModelPersistor(PTFileModelPersistor):
    """PTFileModelPersistor that does not keep the initial model's nn.Module for the whole job.

    The model is named by class path and arguments, plain strings and values: given as NVFlare's
    `{"path": ..., "args": ...}` form, the job's config builder would build the module itself
    and keep it, with the initial weights, in the server's parsed config until the job ends. This
    persistor builds it at start, reads its initial weights, and lets go of it: afterwards it
    only persists the learnables the controller hands it.
    """

    def __init__(
        self,
        model_class: str,
        model_args: dict[str, Any] | None = None,
        allow_numpy_conversion: bool = True,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
        background_save: bool = True,
    ):
        super().__init__(
            allow_numpy_conversion=allow_numpy_conversion, best_global_model_file_name=best_global_model_file_name
        )
        self.model_class = model_class
        self.model_args = dict(model_args or {})
        # Checkpoints are written off the round's critical path; END_RUN waits for the last one.
        self.background_save = background_save
        self._writer: CheckpointWriter | None = None
        # Set by LeanFedAvg before each round's save: written into the checkpoint (fedllm.flare.resume).
        self.progress: RoundProgress | None = None
        # A continuation job's starting point (None for a job that starts from the initial model).
        self.resume_folder: ResumeFolder | None = None
        self.resumed_progress: RoundProgress | None = None

    def _initialize(self, fl_ctx):
        self.resume_folder = ResumeFolder.of_job(fl_ctx)
        previous = self.resume_folder.checkpoint(self.global_model_file_name) if self.resume_folder else None
        if self.resume_folder is not None:
            crash_point("continuation-deploy", job_process=True)
        if previous is not None:
            # Go on from the interrupted job's last global model; the initial one is not even built.
            self.model, self.source_ckpt_file_full_name, self.load_device = None, str(previous), "cpu"
            self.load_weights_only = False  # this server's own checkpoint (its metadata may hold numpy values)
            self.resumed_progress = read_progress(previous)
        else:
            self.model = {"path": self.model_class, "args": self.model_args}  # built by PTFileModelPersistor
        super()._initialize(fl_ctx)
        if self.resume_folder is not None:
            # This job's result holds the models so far even if no round is left to run, or no better model comes.
            for name, target in (
                (self.global_model_file_name, self._ckpt_save_path),
                (self.best_global_model_file_name, self._best_ckpt_save_path),
            ):
                if (source := self.resume_folder.checkpoint(name)) is not None:
                    link_or_copy(source, Path(target))

    def load_model(self, fl_ctx):
        learnable = super().load_model(fl_ctx)
        self.model = None  # the weights live on in `learnable` as long as the controller needs them
        return learnable

    def save_model_file(self, save_path: str) -> None:
        snapshot = self.persistence_manager.to_persistence_dict()  # references, taken now: consistent
        if self.progress is not None:
            snapshot[PROGRESS_KEY] = self.progress.to_dict()
        if not self.background_save:
            write_checkpoint(snapshot, save_path)
            return
        if self._writer is None:
            self._writer = CheckpointWriter()
        self._writer.submit(snapshot, save_path)

    def flush(self) -> None:
        """Wait until every checkpoint asked for so far is on disk (raises CheckpointWriteError)."""
        if self._writer is not None:
            self._writer.wait()

    def get_model_inventory(self, fl_ctx):
        """The saved global models (the final evaluation lists them): every pending checkpoint on disk first."""
        self.flush()
        return super().get_model_inventory(fl_ctx)

    def get_model(self, model_file, fl_ctx):
        self.flush()
        return super().get_model(model_file, fl_ctx)

    def handle_event(self, event: str, fl_ctx) -> None:
        super().handle_event(event, fl_ctx)
        if event == EventType.END_RUN and self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()  # the job ends with its last global model on disk
            except CheckpointWriteError as exc:
                self.system_panic(str(exc), fl_ctx)


MODEL_SELECTOR_ID = "model_selector"  # the id NVFlare's BaseFedJob gives its IntimeModelSelector
# Key in every train task's meta: the id of the job as first submitted, which its continuations keep. Sites key
# their trainer state by it (fedllm.training.lineage), so a continuation's trainers go on where the last left off.
LINEAGE_META = "fedllm_lineage"


class LeanFedAvg(FedAvg):
    """NVFlare's FedAvg with one global model in server RAM between rounds, resumable (see the module doc).

    It only overrides methods (no __init__, no state of its own): fedllm.jobs.recipe re-types the
    FedAvg that NVFlare's recipe builds.
    """

    def load_model(self):
        model = super().load_model()
        folder = getattr(self.persistor, "resume_folder", None)
        if folder is not None:
            self._resume_from(folder, getattr(self.persistor, "resumed_progress", None))
        self._stop_at_dp_budget()
        return model

    def _stop_at_dp_budget(self) -> None:
        """A `--dp` job runs no round past its privacy budget (fedllm.flare.dp_budget): fewer rounds, same end."""
        engine = getattr(self, "engine", None)
        budget = engine.get_component(DP_BUDGET_ID) if engine is not None else None
        if not isinstance(budget, DPBudget):
            return
        total = self.start_round + self.num_rounds
        if budget.last_round(total) >= total:
            self.info(f"DP budget ε={budget.epsilon:g} (δ={budget.delta:g}) holds for all {total} rounds")
            return
        self.num_rounds = max(0, budget.last_round(total) - self.start_round)
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        self.info(budget.reason(total))

    def _resume_from(self, folder: ResumeFolder, progress: RoundProgress | None) -> None:
        """Start after the interrupted job's last completed round, with its rounds' metrics and selector state."""
        total = self.start_round + self.num_rounds
        done = progress.round if progress is not None else -1
        self.start_round, self.num_rounds = done + 1, max(0, total - done - 1)
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        if progress is not None:
            selector = self._model_selector()
            if selector is not None:
                if progress.best_val_metric is not None:
                    selector.best_val_metric = progress.best_val_metric
                selector.best_raw_val_metric = progress.best_raw_val_metric
            self.best_target_metric_value = progress.best_target_metric_value
            self.num_fl_rounds_without_improvement = progress.rounds_without_improvement
        lines, missing = completed_round_lines(folder.metrics_text(), done)
        if missing:
            self.warning(f"the interrupted job's metrics lack round(s) {missing}; they are missing here too")
        if lines:
            write_text(Path(self.get_run_dir()) / METRICS_FILE, "\n".join(lines) + "\n")
        info = folder.info
        self.info(
            f"continuing job {info.get('origin_job')} (interrupted: {info.get('reason')}) from job "
            f"{info.get('from_job')}: rounds {self.start_round}..{total - 1} of {total}"
        )

    def _model_selector(self):
        """NVFlare's best-model selector of this job, whose state a continuation must carry on."""
        engine = getattr(self, "engine", None)
        selector = engine.get_component(MODEL_SELECTOR_ID) if engine is not None else None
        return selector if hasattr(selector, "best_val_metric") else None

    def save_model(self, model):
        if isinstance(self.persistor, LeanPTFileModelPersistor):
            selector = self._model_selector()
            self.persistor.progress = RoundProgress(
                round=self.current_round,
                num_rounds=self.start_round + self.num_rounds,
                best_val_metric=_float_or_none(getattr(selector, "best_val_metric", None)),
                best_raw_val_metric=_float_or_none(getattr(selector, "best_raw_val_metric", None)),
                best_target_metric_value=_float_or_none(self.best_target_metric_value),
                rounds_without_improvement=int(self.num_fl_rounds_without_improvement),
            )
            # The rounds this checkpoint completes have their metric lines on disk before it is.
            sync_file(Path(self.get_run_dir()) / METRICS_FILE)
        super().save_model(model)

    def sample_clients(self, num_clients=None):
        crash_point("round-start", self.current_round, job_process=True)  # a test hook, inert unless set
        return super().sample_clients(num_clients)

    def _aggregate_one_result(self, result) -> bool:
        accepted = super()._aggregate_one_result(result)
        crash_point("aggregation", self.current_round, job_process=True)  # a test hook, inert unless set
        return accepted

    def lineage(self) -> str:
        """The id of the job as first submitted: this job's own, or the one this continuation goes on with."""
        if getattr(self, "_fedllm_lineage", None) is None:
            folder = getattr(getattr(self, "persistor", None), "resume_folder", None)
            origin = folder.info.get("origin_job") if folder is not None else None
            self._fedllm_lineage = str(origin or self.fl_ctx.get_job_id())
        return self._fedllm_lineage

    def _build_shareable(self, data=None):
        if data is not None and isinstance(data.params, dict) and not isinstance(data.params, SharedWeights):
            data.params = SharedWeights(data.params)
        shareable = super()._build_shareable(data)
        # NVFlare's FedAvg sends the rounds THIS job runs as total_rounds; a continuation runs only those left
        # (start_round = the first of them), while its sites' LR schedules must span the job as first submitted.
        shareable.set_header(AppConstants.NUM_ROUNDS, self.start_round + self.num_rounds)
        dxo = from_shareable(shareable)
        dxo.set_meta_prop(LINEAGE_META, self.lineage())
        return dxo.update_shareable(shareable)

    def update_model(self, model, aggr_result):
        held = self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        model = super().update_model(model, aggr_result)
        fresh = self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if isinstance(held, ModelLearnable) and isinstance(fresh, ModelLearnable) and held is not fresh:
            # Contexts created in earlier rounds hold `held`: refill it instead of replacing it.
            held.clear()
            held.update(fresh)
            self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, held, private=True, sticky=True)
        return model


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
