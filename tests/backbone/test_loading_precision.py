"""Loading straight into a dtype: every weight in the target dtype, nothing left on the meta
device, the RoPE frequencies kept fp32, and the fp32 load unchanged."""

import pytest
import torch

from backbone.loading import load_model
from tiny_models import load_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_load_in_the_target_dtype_with_fp32_rope(tiny_llama_dir, dtype):
    model = load_model(tiny_llama_dir, dtype=dtype)
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if name != "inv_freq"]
    assert all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"
    reference = load_reference(tiny_llama_dir)
    for name, value in reference.state_dict().items():
        if name in dict(model.named_parameters()):
            assert torch.equal(dict(model.named_parameters())[name], value.to(dtype)), name
