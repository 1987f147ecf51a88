"""The root of fedllm's expected errors: the CLI prints these in one line of red and exits 1."""


class FedllmError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""
