"""The `fedllm` command line: one module per command group, assembled in fedllm.cli.main."""
