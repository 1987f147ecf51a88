"""fedllm: federated fine-tuning of large language models with NVIDIA FLARE and NeMo."""

__version__ = "0.1.0"
