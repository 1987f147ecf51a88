"""Job templates (`jobs/*.yaml`): what a site trains, with which defaults.

A template names the trainer module every site runs through NVFlare's Client API, the
server's initial model (if the server keeps one), and default arguments. `fedllm job
create` turns a template plus the run's mode and sizes into an NVFlare job folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedllm.config.loader import load_model
from fedllm.config.problems import ConfigError, FixableError, Problem
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.resources import resource_dir

Mode = Literal["local", "central", "fedavg"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InitialModel(_Strict):
    """A torch.nn.Module the server instantiates and persists as the global model.

    String args may use {model} (the job's --model), e.g. the base checkpoint the server reads.
    """

    class_path: str
    args: dict[str, Any] = Field(default_factory=dict)


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
                f"use global_{v}: the received model's evaluation (losses are minimised, other metrics maximised)",
            )
        return v

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
