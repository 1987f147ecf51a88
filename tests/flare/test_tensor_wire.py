"""fedllm's raw-slice tensor items: what the sender produces crosses FOBS and rebuilds the exact tensors."""

from __future__ import annotations

import json

import pytest
import torch
from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
from nvflare.fuel.f3.streaming.download_service import ProduceRC
from nvflare.fuel.utils import fobs
from safetensors import safe_open

from fedllm.flare.tensor_wire import (
    TensorViewConsumer,
    TensorViewDiskConsumer,
    TensorViewDownloadable,
    WireTensor,
    WireViews,
)
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.template import load_template

CHUNK = 1 << 20


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "T0": torch.randn(700, 1024, generator=gen),  # 2.7 MiB: split over three requests
        "T1": torch.randn(5, generator=gen).to(torch.bfloat16),  # numpy has no bf16
        "T2": torch.zeros(0),
        "T3": torch.tensor(3.5, dtype=torch.float64),
        "T4": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # non-contiguous
        "T5": torch.tensor([True, False]),
    }


def _download(source: TensorViewDownloadable, *consumers) -> int:
    """Run the request/reply loop the download service runs, through a FOBS round trip per reply."""
    state, replies = {}, 0
    while True:
        rc, items, state = source.produce(state, "site-1")
        if rc == ProduceRC.EOF:
            break
        assert rc == ProduceRC.OK
        reply = fobs.loads(fobs.dumps({"items": items, "state": state}, buffer_list=True))
        assert sum(len(item[-1]) for item in reply["items"]) <= CHUNK
        for consumer in consumers:
            consumer.consume("ref", reply["state"], reply["items"])
        replies += 1
    for consumer in consumers:
        consumer.download_completed("ref")
    return replies


def test_slices_rebuild_every_tensor_exactly_in_memory_and_on_disk(tmp_path):
    tensors = _tensors()
    memory, disk = TensorViewConsumer(), TensorViewDiskConsumer(str(tmp_path))
    replies = _download(TensorViewDownloadable(tensors, CHUNK), memory, disk)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert replies == -(-total // CHUNK)  # every reply full but the last
    lazy = LazyTensorDict(disk.result, str(tmp_path))
    for key, want in tensors.items():
        for got in (memory.result[key], lazy[key], lazy.make_lazy_ref(key).materialize()):
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert torch.equal(got, want), key
    assert memory.error is None and disk.error is None
    # The files are ordinary safetensors: any reader opens them.
    path, key = disk.result["T0"]
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor(key), tensors["T0"])


def test_sender_does_not_copy_contiguous_tensors():
    t = torch.randn(1000)
    source = TensorViewDownloadable({"T0": t}, CHUNK)
    t[0] = 42.0  # a view of the tensor's storage sees the change
    _, items, _ = source.produce({}, "site-1")
    assert torch.frombuffer(bytes(items[0][-1][:4]), dtype=torch.float32).item() == 42.0


def test_a_retried_request_gets_the_same_slices():
    source = TensorViewDownloadable(_tensors(), CHUNK)
    _, first, state = source.produce({}, "site-1")
    _, again, state_again = source.produce({}, "site-1")
    assert state == state_again
    assert [bytes(i[-1]) for i in first] == [bytes(i[-1]) for i in again]


def test_missing_or_reordered_slices_fail_the_download(tmp_path):
    source = TensorViewDownloadable({"T0": torch.randn(700, 1024)}, CHUNK)
    _, first, state = source.produce({}, "site-1")
    _, second, _ = source.produce(state, "site-1")
    consumer = TensorViewConsumer()
    with pytest.raises(ValueError, match="out of order"):
        consumer.consume_items(second, None)
    truncated = TensorViewDiskConsumer(str(tmp_path))
    truncated.consume_items(first, None)
    truncated.download_completed("ref")
    assert "incomplete" in truncated.error


def test_filter_wraps_only_tensors_and_leaves_the_input_alone():
    from nvflare.apis.dxo import DXO, DataKind

    weights = {"w": torch.ones(2), "n": 3}
    dxo = DXO(DataKind.WEIGHTS, data=weights, meta={"k": 1})
    out = WireViews().process_dxo(dxo, None, None)
    assert isinstance(out.data["w"], WireTensor) and out.data["n"] == 3
    assert isinstance(weights["w"], torch.Tensor), "the server filters the same task data once per site"
    assert out.meta == {"k": 1}


def _output_filters(job, side: str) -> list[str]:
    config = json.loads((job / "app" / "config" / f"config_fed_{side}.json").read_text())
    key = "task_data_filters" if side == "server" else "task_result_filters"
    return [f["path"].rsplit(".", 1)[-1] for chain in config.get(key, []) for f in chain["filters"]]


@pytest.mark.parametrize(
    ("exchange", "compression", "server_out"),
    [
        ({}, "fp16", ["PrecisionCast", "WireViews"]),  # views last: after the cast
        ({}, "none", ["WireViews"]),
        ({"tensor_items": "safetensors"}, "none", []),
        ({"profile": "stock"}, "none", []),
    ],
)
def test_jobs_send_views_from_both_sides_unless_told_otherwise(tmp_path, exchange, compression, server_out):
    template = load_template("demo-mlp")
    template = template.model_copy(update={"exchange": ExchangeOptions.model_validate(exchange)})
    job = create_job(resolve_spec(template, "fedavg", rounds=2, compression=compression), tmp_path)
    assert _output_filters(job, "server") == server_out
    assert _output_filters(job, "client") == server_out
    # A site's trainer process may download the server's views itself (external-process trainers).
    assert "tensor_wire import register" in (job / "app" / "custom" / "fedllm_site_entry.py").read_text()


def test_download_references_get_a_datum_type_of_their_own():
    from nvflare.fuel.utils.fobs import dots

    from fedllm.flare.tensor_wire import WIRE_TENSOR_DOWNLOAD, register

    register()
    nvflare_dots = {v for k, v in vars(dots).items() if k.isupper()}
    assert WIRE_TENSOR_DOWNLOAD not in nvflare_dots
    assert 0 < WIRE_TENSOR_DOWNLOAD < 256  # one byte in FOBS's datum header
    assert fobs.get_dot_handler(WIRE_TENSOR_DOWNLOAD).supported_type() is WireTensor


def test_a_dtype_without_raw_slices_names_the_setting_that_avoids_it():
    with pytest.raises(TypeError, match="tensor_items: safetensors"):
        TensorViewDownloadable({"T0": torch.zeros(2, dtype=torch.complex64)}, CHUNK)
