"""bf16 linear layers on the CPU with the weight in oneDNN's blocked layout, packed once.

`F.linear` in bf16 on the CPU runs oneDNN's brgemm matmul (avx512_core_bf16) on the plain
(out, in) weight, which it copies into its blocked layout inside every call (ONEDNN_VERBOSE shows
`wei:ba`; the packed weight is `AB16b64a2b`): for a 16-row decode step that copy costs about as
much as the product. Packing each weight once (`torch.ops.mkldnn._reorder_linear_weight`, the
prepacking torch.compile's CPU backend does) and calling the packed linear gives the bits
F.linear gives (tests/backbone/test_packed_linear.py) and, measured on an AVX-512-BF16 CPU
without AMX, one thread, 16 rows, fastest of 30: lm_head (49152x576) 10.8 -> 5.8 ms, gate/up
(3072x576) 0.37 -> 0.29 ms, down (576x1536) 0.21 -> 0.15 ms. A default-model decode step with
every projection packed went from 90 to 60 ms (fp32: 149 ms; fastest of 21 interleaved steps).
Prefill-sized inputs (1024 rows) run as fast as before.

The price is memory: the packed copy sits beside the weight (the weight stays: checkpoints,
adapter merges, the embedding and the fp32 logit refinement read it), so every packed weight is
held twice. fp32 is left to `F.linear` (MKL), which needs no reorder, so fp32 results stay bit
for bit what they were. Packing is for inference only: the packed op has no backward.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from backbone.precision import cpu_has_native_bf16

# id(weight) -> (the weight, weakly; its version and data pointer when packed; the packed copy).
# The version moves with every in-place change (an adapter merge into a fused view included, as
# views share their base's counter), the data pointer with a `.data` swap: either repacks.
_packed: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}


@functools.cache
def packing_available() -> bool:
    """oneDNN is built in and the CPU computes bf16 natively (elsewhere oneDNN would emulate it)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and cpu_has_native_bf16()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed weight where that is the same and faster."""
    if not _packs(x, weight, bias):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


def _packs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return False
    if bias is not None and bias.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # no backward through the packed op
    if weight.is_inference():
        return False  # no version counter to tell an in-place change by
    return weight.dim() == 2 and x.dim() >= 2 and packing_available()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of `weight`, (re)made when the weight has changed since."""
    key = id(weight)
    entry = _packed.get(key)
    if entry is not None:
        ref, version, pointer, packed = entry
        if ref() is weight and version == weight._version and pointer == weight.data_ptr():
            return packed
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    # The entry goes with the weight: a later tensor that reuses the id never sees a stale copy.
    ref = weakref.ref(weight, lambda _: _packed.pop(key, None))
    _packed[key] = (ref, weight._version, weight.data_ptr(), packed)
    return packed
