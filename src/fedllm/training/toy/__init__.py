"""The smallest trainers: a classifier that learns in seconds (demo-mlp) and an echo of any size (exchange)."""
