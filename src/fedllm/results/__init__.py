"""What a finished job leaves: per-round metrics, the global model, reports and inference with it."""
