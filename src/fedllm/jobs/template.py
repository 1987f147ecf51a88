"""Job templates (`jobs/*.yaml`): what a site trains, with which defaults.

A template names the trainer module every site runs through NVFlare's Client API, the
server's initial model (if the server keeps one), and default arguments. `fedllm job
create` turns a template plus the run's mode and sizes into an NVFlare job folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedllm.config.loader import load_model
from fedllm.config.problems import ConfigError, FixableError, Problem
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.resources import resource_dir

Mode = Literal["local", "central", "fedavg"]
Direction = Literal["min", "max"]

# Whether lower or higher is better for each metric fedllm's trainers report (fedllm.training.core):
# a template whose key metric is not listed says so itself (key_metric_mode). Never guessed from the name.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "val_loss": "min",
    "val_perplexity": "min",
    "val_accuracy": "max",
    "val_macro_f1": "max",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InitialModel(_Strict):
    """A torch.nn.Module the server instantiates and persists as the global model.

    String args may name the job's trainer arguments: "{lora_r}" alone takes that argument's value (its
    type kept; the trainer's default when the job does not set it), "{model}.nemo" its text. So the
    server's model follows --model and -a. A `token_dim` is set to the hidden size of the job's model
    when that model is readable where the job is created (fedllm.jobs.create).
    """

    class_path: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_path")
    @classmethod
    def _class_path(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) < 2 or not all(part.isidentifier() for part in parts):
            raise FixableError(
                f"class_path '{v}' is not a module.Class path", "use e.g. fedllm.flare.server_models.TinyClassifier"
            )
        return v


class Defaults(_Strict):
    rounds: int = Field(default=5, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    num_clients: int = Field(default=3, ge=1)
    devices: int = Field(default=1, ge=1)


class JobTemplate(_Strict):
    name: str
    description: str = ""
    # Python module each site runs (Client API loop); it reads the arguments below as --key value.
    trainer: str
    # Server-side global model; None when the sites agree on the initial weights themselves.
    initial_model: InitialModel | None = None
    # The metric the server uses to pick the best global model: the evaluation of the global model the
    # sites RECEIVED (global_*), which is what NVFlare's IntimeModelSelector takes FLModel.metrics to be.
    key_metric: str = "global_val_accuracy"
    # Whether lower (min) or higher (max) key_metric values are better; may be left out for the metrics
    # fedllm's trainers report (METRIC_DIRECTIONS), must be given for any other.
    key_metric_mode: Direction | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    # After the last FedAvg round every site evaluates the final global model (NVFlare's final global
    # evaluation; the result's cross_site_val/ holds it): the number reports and the demo print.
    # Local-only jobs never do (their aggregate is meaningless); false for jobs with nothing to evaluate.
    final_evaluation: bool = True
    # How a site starts the trainer: in the site's job process, or as its own process under
    # `torchrun --nproc_per_node <devices>` (NeMo/Megatron: one process per GPU, launched once per job).
    launch: Literal["in_process", "torchrun"] = "in_process"
    # Arguments for the trainer. Paths may use {data_dir} (the site's data directory) and {site}.
    # A `rounds` key is filled with the job's rounds (trainers that size their data for the whole job).
    train_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # How weights travel between server and sites (fedllm.jobs.exchange, docs/exchange.md).
    exchange: ExchangeOptions = Field(default_factory=ExchangeOptions)

    @field_validator("key_metric")
    @classmethod
    def _key_metric(cls, v: str) -> str:
        if not v.startswith("global_"):
            raise FixableError(
                f"key_metric '{v}' is a site's metric after local training, but NVFlare's model selector marks the "
                "global model the sites received as best",
                f"use global_{v}: the received model's evaluation",
            )
        return v

    @model_validator(mode="after")
    def _key_metric_direction(self) -> JobTemplate:
        if self.key_metric_mode is None and self.key_metric.removeprefix("global_") not in METRIC_DIRECTIONS:
            raise FixableError(
                f"key_metric '{self.key_metric}': fedllm does not know whether lower or higher is better",
                "add key_metric_mode: min (lower is better, like a loss or perplexity) or max (like an accuracy)",
            )
        return self

    @property
    def key_metric_direction(self) -> Direction:
        """min or max: which key_metric values NVFlare's model selector takes as the better model."""
        return self.key_metric_mode or METRIC_DIRECTIONS[self.key_metric.removeprefix("global_")]

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if not all(part.isidentifier() for part in v.split(".")):
            raise FixableError(f"trainer '{v}' is not a module path", "use e.g. fedllm.training.toy.demo_mlp")
        return v


def template_path(name_or_path: str) -> Path:
    """Resolve a template name (`demo-mlp`) or a path to its YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return resource_dir("jobs") / f"{name_or_path}.yaml"


def available_templates() -> list[str]:
    return sorted(p.stem for p in resource_dir("jobs").glob("*.yaml"))


def load_template(name_or_path: str) -> JobTemplate:
    path = template_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "",
                    f"no job template '{name_or_path}'",
                    f"use one of: {', '.join(available_templates())}, or a path to a template YAML",
                )
            ],
            kind="job template",
        )
    return load_model(path, JobTemplate, kind="job template")
