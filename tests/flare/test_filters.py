"""The precision filters on real NVFlare DXOs: half the bytes out, the original dtype back, inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey

from fedllm.flare.filters import BYTES_ON_WIRE, PrecisionCast, PrecisionRestore


def _dxo() -> DXO:
    rng = np.random.default_rng(0)
    data = {"w": rng.normal(size=(64, 32)).astype(np.float32), "steps": np.array([3], dtype=np.int64)}
    return DXO(DataKind.WEIGHTS, data=data, meta={MetaKey.INITIAL_METRICS: {"val_loss": 1.0}})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_halves_the_float_bytes_and_restore_brings_fp32_back(precision: str) -> None:
    dxo = _dxo()
    original = dxo.data["w"].copy()
    cast = PrecisionCast(precision).process_dxo(dxo, None, None)
    assert dxo.data["w"].dtype == np.float32  # the input is not modified (the server filters it once per site)
    assert cast.data["steps"].dtype == np.int64  # integers are left alone
    assert cast.get_meta_prop(MetaKey.INITIAL_METRICS)[BYTES_ON_WIRE] == 64 * 32 * 2 + 8
    restored = PrecisionRestore().process_dxo(cast, None, None)
    assert restored.data["w"].dtype == np.float32
    assert np.allclose(restored.data["w"], original, atol=1e-2 if precision == "bf16" else 1e-3)
    assert restored.get_meta_prop("fedllm_original_dtypes") is None


def test_torch_tensors_are_cast_too() -> None:
    dxo = PrecisionCast("fp16").process_dxo(DXO(DataKind.WEIGHTS, data={"w": torch.ones(4, 4)}), None, None)
    assert dxo.data["w"].dtype == torch.float16
    assert PrecisionRestore().process_dxo(dxo, None, None).data["w"].dtype == torch.float32
