"""Merge an adapter into the base weights (W += scale * B @ A) and take it out again.

For single-adapter use: a merged model runs at the bare base's speed. The delta is computed in
fp32 whatever the weights' dtype and checked for finiteness before anything is written, so a
broken adapter names its module and leaves the model untouched. The merged adapter is recorded on
the model, which makes merging the same adapter twice a no-op and unmerging without a merge an
error rather than a silent corruption.
"""

from __future__ import annotations

import torch

from backbone.model import CausalLM

from adapters.errors import MergeError, NonFiniteWeightsError, UnknownTargetModuleError
from adapters.weights import AdapterWeights

# The attribute on the model that records which adapter its weights currently include.
MERGED_ATTRIBUTE = "merged_adapter"


def merged_adapter(model: CausalLM) -> AdapterWeights | None:
    return getattr(model, MERGED_ATTRIBUTE, None)


def merge_adapter(model: CausalLM, weights: AdapterWeights) -> None:
    """Add the adapter's deltas to the model's weights; a second call with the same adapter
    does nothing, another adapter must wait for `unmerge_adapter`."""
    current = merged_adapter(model)
    if current is weights:
        return
    if current is not None:
        raise MergeError(
            f"the model already has adapter {current.source or '(in memory)'} merged; unmerge it before merging "
            f"{weights.source or 'another'}"
        )
    deltas = _deltas(model, weights)
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = model.linear_modules()[module].weight
            weight.copy_((weight.float() + delta).to(weight.dtype))
    setattr(model, MERGED_ATTRIBUTE, weights)


def unmerge_adapter(model: CausalLM) -> AdapterWeights | None:
    """Subtract the merged adapter's deltas again; returns it (None when nothing was merged)."""
    weights = merged_adapter(model)
    if weights is None:
        return None
    deltas = _deltas(model, weights)
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = model.linear_modules()[module].weight
            weight.copy_((weight.float() - delta).to(weight.dtype))
    setattr(model, MERGED_ATTRIBUTE, None)
    return weights


def _deltas(model: CausalLM, weights: AdapterWeights) -> dict[str, torch.Tensor]:
    linears = model.linear_modules()
    deltas = {}
    for module in weights.tensors:
        if module not in linears:
            raise UnknownTargetModuleError(
                f"adapter {weights.source or '(in memory)'} targets {module!r}, which the model does not have; "
                "use an adapter trained for this base model"
            )
        weight = linears[module].weight
        delta = weights.delta(module).to(weight.device)
        if tuple(delta.shape) != tuple(weight.shape):
            raise MergeError(f"adapter delta for {module!r} is {tuple(delta.shape)}, the weight is {tuple(weight.shape)}")
        if not torch.isfinite(weight.float() + delta).all():
            raise NonFiniteWeightsError(
                f"merging adapter {weights.source or '(in memory)'} makes {module!r} non-finite; the adapter is "
                "broken (or too large for the weights' dtype), nothing was merged"
            )
        deltas[module] = delta
    return deltas
