"""fedllm's NeMo backend: Megatron-GPT p-tuning and SFT on sites that run NeMo (nemo_toolkit >=1.23,<2.5).

Nothing here imports NeMo at module import time: config building, checkpoint inspection and the
server-side models run on any machine; the site trainers (fedllm.training.nemo_ptuning,
fedllm.training.nemo_sft) import NeMo when they start and say clearly when it is missing.
"""
