"""What NVFlare loads by class path inside the server and site processes: the tensor wire decomposer,
message filters, the lean FedAvg controller and persistor, and the server's global models.

Nothing here runs on the operator's side except as a class path in a job config; it leans on NVFlare
2.9's internals (pinned in pyproject.toml) and imports only fedllm.checkpoint besides NVFlare and torch.
"""
