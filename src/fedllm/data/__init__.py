"""Data tools: Financial PhraseBank, SFT sets (Alpaca, Dolly, OASST1), site splits, a synthetic corpus.

Every tool reads a public format, writes jsonl atomically (all files or none) and raises
`DataError` naming the file, the problem and the fix.
"""

from fedllm.data.io import DataError, read_jsonl, write_jsonl_files

__all__ = ["DataError", "read_jsonl", "write_jsonl_files"]
