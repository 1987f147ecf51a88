"""The NeMo backend: Megatron-GPT p-tuning and SFT on sites that run NeMo.

Nothing here imports NeMo at module import time: config building and the checks before a model
loads run on any machine; the site trainers (ptuning, sft) import NeMo when they start and say
clearly when it is missing.
"""
