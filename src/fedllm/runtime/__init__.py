"""Running a provisioned federation: native processes, container entry points, Kubernetes charts, the
admin session, the per-site environment and GPU preflight."""
