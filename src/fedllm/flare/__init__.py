"""What NVFlare loads by class path inside the server and site processes: the tensor wire decomposer,
message filters, the lean FedAvg controller and persistor, the server's global models, and the site's
registration marker (read by the site containers' healthcheck).

Nothing here runs on the operator's side except as a class path in a job config or a kit's resources
(provisioning and the container entry share the registration marker's file name); it leans on NVFlare
2.9's internals (pinned in pyproject.toml) and imports only fedllm.checkpoint and fedllm.fileio besides
NVFlare and torch.
"""
