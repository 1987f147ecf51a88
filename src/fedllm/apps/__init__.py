"""Whole programs built from the pipeline's parts: the demo, the NeMo GPU proof, a local federation."""
