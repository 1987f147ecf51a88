"""Fuzzing every reader of `.nemo` files: damaged members and bad config values end in fedllm's own error or
in a success that provably changed nothing.

Four small archives — NeMo's per-rank layout, the same after `fedllm ckpt convert` (which adds
fedllm_checksums.json), NeMo 2's distributed layout, and a gzip tar — are damaged one member at a time
(the member's bytes truncated, bit-flipped, overwritten, ...; or the archive's own bytes inside that
member's header or data) and fed to `ckpt info`, `verify`, `convert --check-equal` and `export-hf`.
Every run must end cleanly (no traceback) and leave no partial output. Where the damaged bytes are covered
by a checksum (tar headers, torch zip records, gzip, fedllm_checksums.json), each command must either
refuse with an error naming the member (or the damaged header's byte offset) or succeed with exactly the
output it gives for the intact file — which happens only where the damage missed data (tar padding, a
zip header field no reader uses, a record the command never reads). NeMo writes no checksum over
model_config.yaml, tokenizer files, a distributed checkpoint's `.metadata` and `metadata.json`: damage
there is refused only where it breaks their parsing or their agreement with the weights, so for those
members of NeMo-written archives the test asks for a clean outcome only (docs/checkpoints.md).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from fedllm.checkpoint import convert
from fedllm.checkpoint.archive import CHECKSUMS_NAME
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    Outcome,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    run_cli,
    snapshot,
)
from tests.support.nemo_files import replace_member, tar_members, write_members
from tests.support.synthetic_checkpoint import TinyGPT, write_distributed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp_to_torch_save's "single process" notice
CONFIG = "model_config.yaml"
UNREADABLE = "<unreadable>"


@dataclass(frozen=True)
class Span:
    """Where one member lies in the archive file: its header block(s) and its data."""

    name: str
    header: int
    data: int
    size: int


@dataclass
class Case:
    path: Path
    spans: list[Span]
    strict: set[str]  # members covered by a checksum: damage is refused or harmless
    gzip: bool
    reference: dict[str, object]  # what each command gives on the intact archive


def _spans(path: Path) -> list[Span]:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
    with tarfile.open(path, "r:") as tar:
        spans = [Span(m.name.removeprefix("./"), m.offset, m.offset_data, m.size) for m in tar if m.isfile()]
        end = tar.offset  # tar's end-of-archive blocks: damage there is damage to the listing
    return [*spans, Span("(end of archive)", end, end, size - end)]


# -- what a command gives: the outputs compared with the intact archive's ----------------------------------------
def _canonical(value: object) -> object:
    if isinstance(value, torch.Tensor):
        flat = value.detach().contiguous().reshape(-1)
        return (str(value.dtype), tuple(value.shape), flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    if isinstance(value, io.BytesIO):  # an extra state: a torch.save blob is compared by what torch.load reads
        data = value.getvalue()
        return ("BytesIO", _torch_file(data) if data.startswith(b"PK\x03\x04") else data)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _torch_file(data: bytes) -> object:
    return _canonical(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False))


def _distributed(members: dict[str, bytes]) -> object:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in members.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        dcp_to_torch_save(Path(tmp) / "model_weights", Path(tmp) / "merged.pt")
        merged = _torch_file((Path(tmp) / "merged.pt").read_bytes())
    common = members.get("model_weights/common.pt")
    return merged, _torch_file(common) if common is not None else None, members.get("model_weights/metadata.json")


def content(path: Path) -> object:
    """What the archive holds as NeMo's own readers see it (torch.load and torch.distributed.checkpoint, which
    check no CRC): tensors and values, artifacts' bytes. Damage that leaves this unchanged touched no data."""
    try:
        members = tar_members(path)
        out: dict[str, object] = {}
        weights = {n: b for n, b in members.items() if n.startswith("model_weights/")}
        for name, data in members.items():
            if name in weights:
                continue
            if name.endswith(".ckpt"):
                out[name] = _torch_file(data)
            elif name == CHECKSUMS_NAME:
                out[name] = json.loads(data)
            else:
                out[name] = data
        if weights:
            out["model_weights/"] = _distributed(weights)
        return out
    except (Exception, CheckpointException):  # a reader that fails on the damaged file: its data is not what it was
        return UNREADABLE


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _info_lines(outcome: Outcome) -> list[str]:
    """The summary without its first line (the file's path) and its size on disk."""
    return [line for line in outcome.out.splitlines()[1:] if "on disk" not in line]


def run_readers(source: Path, work: Path, check) -> None:
    """Every reader command on `source`; `check(command, outcome, output)` judges each; outputs are removed."""
    target, folder = work / "converted.nemo", work / "hf"
    convert_args = ["--source", source, "--target", target, "--target-tp", "1", "--check-equal", "--no-progress"]
    commands = {
        "info": ["ckpt", "info", source],
        "verify": ["ckpt", "verify", source],
        "convert": ["ckpt", "convert", *convert_args],
        "export-hf": ["ckpt", "export-hf", source, "--out", folder],
    }
    for command, args in commands.items():
        before = snapshot(work)
        outcome = run_cli(args)
        assert_clean(outcome, allowed=(0, 1))
        assert_no_partial_output(outcome, work, before)
        produced: object = None
        if outcome.code == 0:
            if command == "info":
                produced = _info_lines(outcome)
            elif command == "verify":
                produced = content(source)
            elif command == "convert":
                produced = content(target)
                target.unlink()
            else:
                produced = _folder(folder)
                for p in sorted(folder.rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
                folder.rmdir()
        check(command, outcome, produced)
        assert snapshot(work).keys() == before.keys(), f"{command} left {set(snapshot(work)) - set(before)}"


def _reference(path: Path, work: Path) -> dict[str, object]:
    reference: dict[str, object] = {}

    def keep(command: str, outcome: Outcome, produced: object) -> None:
        assert outcome.code == 0, outcome.text
        reference[command] = produced

    run_readers(path, work, keep)
    return reference


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("fuzz-nemo")
    model = TinyGPT(num_layers=1, vocab_size=60)
    per_rank = model.write(root / "nemo_per_rank.nemo", 2)
    fedllm = convert(model.write(root / "tp1.nemo", 1), root / "fedllm_per_rank.nemo", 2, progress=False).target
    dist = write_distributed(TinyGPT(layout="mcore", num_layers=1, vocab_size=60, seed=3), root / "dist.nemo")
    gz = model.write(root / "nemo_gzip.nemo", 2, gzip=True)

    def weights(names: list[str]) -> set[str]:
        return {n for n in names if n.endswith((".ckpt", ".distcp", ".pt")) or n == "(end of archive)"}

    out = {}
    for key, path in (("nemo_per_rank", per_rank), ("fedllm_per_rank", fedllm), ("nemo_distributed", dist)):
        spans = _spans(path)
        names = [s.name for s in spans]
        strict = set(names) if key == "fedllm_per_rank" else weights(names)
        work = root / f"work-{key}"
        work.mkdir()
        out[key] = Case(path, spans, strict, False, _reference(path, work))
    work = root / "work-gzip"
    work.mkdir()
    out["nemo_gzip"] = Case(gz, [], set(), True, _reference(gz, work))
    return out


# -- damage -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    member: str  # the member hit ("(end of archive)", or "" for a gzip stream's bytes)
    header_at: int | None  # the byte offset of the damaged tar header, when the damage may have hit one
    strict: bool
    how: str  # "member" (its bytes, the tar rebuilt) or flip/truncate/insert at a byte of the archive


@st.composite
def damaged_archive(draw, case: Case, target: Path) -> Damage:
    """`case.path` damaged one way into `target`."""
    raw = case.path.read_bytes()
    if case.gzip:  # one stream: any byte may hit any member, and gzip's CRC-32 covers all of them
        target.write_bytes(draw(corrupted(raw)))
        return Damage("", None, True, "stream")
    span = draw(st.sampled_from(case.spans))
    strict = span.name in case.strict
    if span.name != "(end of archive)" and draw(st.booleans()):  # the member's bytes, the tar rebuilt around them
        data = tar_members(case.path)[span.name]
        replace_member(case.path, target, span.name, draw(corrupted(data)))
        return Damage(span.name, None, strict, "member")
    lo, hi = span.header, max(span.header + 1, span.data + span.size)  # the archive's bytes in this member's span
    at = draw(st.integers(lo, hi - 1))
    kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
    if kind == "flip":
        out = bytearray(raw)
        out[at] ^= 1 << draw(st.integers(0, 7))
        damaged = bytes(out)
    elif kind == "truncate":
        damaged = raw[:at]
    else:
        damaged = raw[:at] + draw(st.binary(min_size=1, max_size=600)) + raw[at:]
    target.write_bytes(damaged)
    in_header = at < span.data or span.name == "(end of archive)"
    # a header's checksum covers it: damage there is strict whatever the member
    return Damage(span.name, span.header, strict or in_header, f"{kind} at byte {at}")


def _names(err: str, damage: Damage) -> bool:
    if damage.member == "":
        return "gzip" in err or ".nemo" in err
    if damage.member in err or (damage.header_at is not None and f"byte {damage.header_at}" in err):
        return True
    if damage.header_at is not None and "after member" in err:
        return True  # a truncation or insertion inside the data: the error names the member before the damage
    if damage.member == CONFIG:
        return "model_config.yaml" in err
    if damage.member.startswith("model_weights/"):
        return "model_weights/" in err  # the index points into the files: either may carry the damage
    return False


def _judge(case: Case, damage: Damage):
    def check(command: str, outcome: Outcome, produced: object) -> None:
        if outcome.code == 1:
            assert _names(outcome.err, damage), f"{command}: the error does not name {damage}:\n{outcome.err}"
        elif damage.strict:
            assert produced == case.reference[command], (
                f"{command} accepted damage to {damage} and gave another result than the intact archive's\n"
                f"{outcome.text}"
            )

    return check


@pytest.mark.parametrize("layout", ["nemo_per_rank", "fedllm_per_rank", "nemo_distributed", "nemo_gzip"])
def test_damaged_members_are_refused_naming_them(cases, layout, tmp_path_factory):
    case = cases[layout]
    work = tmp_path_factory.mktemp(f"damaged-{layout}")

    @FUZZ_SETTINGS
    @given(data=st.data())
    def run(data) -> None:
        source = work / "damaged.nemo"
        damage = data.draw(damaged_archive(case, source))
        run_readers(source, work, _judge(case, damage))

    run()


# -- config values --------------------------------------------------------------------------------------------------
# The fields fedllm reads from model_config.yaml (fedllm.checkpoint.model_spec): every reader refuses a bad value,
# naming the field.
SIZES = [
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "make_vocab_size_divisible_by",
]
FLAGS = ["megatron_legacy", "mcore_gpt", "share_embeddings_and_output_weights"]
NAMES = ["activation", "position_embedding_type"]
OTHERS = [  # read by some commands only (export-hf, vocabulary resolution) or not at all
    "vocab_size",
    "tokenizer",
    "max_position_embeddings",
    "encoder_seq_length",
    "rotary_percentage",
    "rotary_base",
    "layernorm_epsilon",
    "normalization",
    "transformer_block_type",
    "openai_gelu",
    "precision",
    "sequence_parallel",
]
SPECIAL = st.sampled_from([0, -1, -(2**40), 2**40, 10**30, 16.0, 1e308, "sixteen", "16", "", True, False, None, [], {}])


def _invalid(field: str, value: object) -> bool:
    if field in SIZES:
        return value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
    if field in FLAGS:
        return value is not None and not isinstance(value, bool)
    if field in NAMES:
        return value not in (None, "") and not isinstance(value, str)
    return False


def test_bad_config_values_are_refused_naming_the_field(cases, tmp_path_factory):
    case = cases["nemo_per_rank"]
    work = tmp_path_factory.mktemp("config-values")
    members = tar_members(case.path)
    config = yaml.safe_load(members[CONFIG])

    @FUZZ_SETTINGS
    @given(field=st.sampled_from(SIZES + FLAGS + NAMES + OTHERS), value=SPECIAL | st.from_type(int) | _json())
    def run(field, value) -> None:
        source = work / "values.nemo"
        write_members(source, {**members, CONFIG: yaml.safe_dump({**config, field: value}).encode()})
        invalid = _invalid(field, value)

        def check(command: str, outcome: Outcome, produced: object) -> None:
            if invalid:
                assert outcome.code == 1 and field in outcome.err, f"{command} on {field}: {value!r}\n{outcome.text}"
            elif outcome.code == 1:
                assert field in outcome.err or CONFIG in outcome.err, f"{command}: {outcome.err}"

        run_readers(source, work, check)

    run()


def _json() -> st.SearchStrategy:
    from tests.support.cli_fuzz import json_values

    return json_values(max_leaves=4)
