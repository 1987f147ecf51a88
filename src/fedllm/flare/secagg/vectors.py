"""The one flat vector secure aggregation masks, and the named arrays that travel instead of the weights.

A site's update is a dict of named tensors (a prompt encoder, LoRA adapters, full weights: whatever the job
exchanges). The protocol (fedllm.flare.secagg.protocol) masks one flat vector; both sides must cut it the same
way, so the order lives here: parameters in sorted name order, each raveled, then the weight slot. On the
wire every parameter keeps its name and shape (as uint32 ring elements) and the weight slot travels as one
more entry, `WEIGHT_SLOT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

WEIGHT_SLOT = "fedllm_secagg.weight"  # the masked FedAvg weight w_k, one ring element, last in the vector
SECAGG_META = "fedllm_secagg"  # DXO meta of a masked result: {round, site, elements, clamped}
CLAMPED_METRIC = "secagg_clamped"  # elements a site clamped to [-clip, clip] this round (in its metrics)
WEIGHT_CAPPED_METRIC = "secagg_weight_capped"  # 1 when the site's FedAvg weight was above max_weight (counted as it)


def as_numpy(value: Any) -> np.ndarray:
    """A tensor or array as numpy (lazy references NVFlare offloaded to disk are loaded first)."""
    if hasattr(value, "materialize"):
        value = value.materialize()
    if hasattr(value, "detach"):  # torch: bf16 has no numpy dtype, so widen floats first
        import torch

        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the exchanged parameters, in the order the flat vector holds them."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Layout:
        names = tuple(sorted(k for k in params if k != WEIGHT_SLOT))
        return cls(names, tuple(tuple(np.shape(params[k])) for k in names))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, params: Mapping[str, Any], dtype: Any) -> np.ndarray:
        """The parameters as one vector of `dtype`, in layout order (a shape mismatch raises ValueError)."""
        out = np.empty(self.size, dtype=dtype)
        at = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = as_numpy(params[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {shape}")
            n = value.size
            out[at : at + n] = value.ravel()
            at += n
        return out

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """`vector` (layout order) cut back into named arrays of their shapes (views, no copy)."""
        if vector.size != self.size:
            raise ValueError(f"vector of {vector.size} elements for a layout of {self.size}")
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape))
            out[name] = vector[at : at + n].reshape(shape)
            at += n
        return out
