"""The Hugging Face backend: p-tuning, LoRA and full SFT of transformers causal LMs on the sites."""
