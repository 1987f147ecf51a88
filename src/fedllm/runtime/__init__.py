"""Running a provisioned federation: native processes here, compose files in fedllm.provision."""
