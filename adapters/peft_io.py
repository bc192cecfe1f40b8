"""Read and write adapters in PEFT's format (DESIGN decision 3), validating on the way in.

A folder holds adapter_config.json and adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r); some tools write
`.lora_A.<adapter name>.weight`, which reads the same. Tensors arrive as fp32 whatever the file
holds. Every way a file can be wrong has its own error naming the file, the tensor and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.config import LoraConfig
from adapters.errors import (
    AdapterChangedError,
    AdapterConfigError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    CorruptAdapterFileError,
    LinkedAdapterFileError,
    NonFiniteWeightsError,
    RankTooLargeError,
    ShapeMismatchError,
    UnknownTargetModuleError,
    UnpairedTensorError,
    UnsupportedAdapterError,
)
from adapters.module_shapes import linear_shapes
from adapters.untrusted_files import WeightBudget, read_adapter_files
from adapters.weights import AdapterWeights
from backbone.atomic_folder import replace_folder, staging_folder
from backbone.config import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>A|B)(?:\.[^.]+)?\.weight$")
# Tensors of PEFT features we do not serve, by the key fragment that gives them away.
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "LoRA on embeddings is not supported; use an adapter on linear modules only",
    "lora_magnitude_vector": "DoRA magnitude vectors are not supported; retrain with use_dora=false",
    "modules_to_save": "modules_to_save weights are not supported; retrain without modules_to_save",
}


def read_adapter(path: str | Path, budget: WeightBudget | None = None) -> AdapterWeights:
    """Parse a PEFT adapter folder on its own: config, key names, pairs, dtypes, finiteness.
    Checks that need the base model are `load_adapter`'s (which passes its `budget`)."""
    folder = _adapter_folder(Path(path))
    file = folder / WEIGHTS_FILE
    if not file.exists() and file.with_name("adapter_model.bin").is_file():
        raise UnsupportedAdapterError(
            f"{folder} holds adapter_model.bin (pickle); convert it to {WEIGHTS_FILE} with PEFT "
            "(save_pretrained(..., safe_serialization=True))"
        )
    files = read_adapter_files(folder / CONFIG_FILE, file, budget)
    config = _parse_config(folder / CONFIG_FILE, files.config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in files.tensors:
        _parse_key(file, key)  # unsupported features are named before shapes are judged
    for key, tensor in files.tensors.items():
        module, half = _parse_key(file, key)
        if not tensor.dtype.is_floating_point:
            raise CorruptAdapterFileError(f"{file}: tensor {key!r} has dtype {tensor.dtype}; LoRA weights are floats")
        if tensor.dim() != 2:
            raise ShapeMismatchError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}; LoRA weights are matrices "
                "(lora_A (r, in), lora_B (out, r))"
            )
        if not torch.isfinite(tensor).all():
            raise NonFiniteWeightsError(
                f"{file}: tensor {key!r} holds NaN or infinite values; the training run diverged, use an earlier checkpoint"
            )
        halves.setdefault(module, {})[half] = tensor.float()
    tensors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            present, absent = ("A", "B") if "A" in pair else ("B", "A")
            raise UnpairedTensorError(
                f"{file}: module {module!r} has lora_{present} but no lora_{absent}; the file is incomplete, "
                "save the adapter again"
            )
        lora_A, lora_B = pair["A"], pair["B"]
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ShapeMismatchError(
                f"{file}: module {module!r} has lora_A of rank {lora_A.shape[0]} but lora_B of rank "
                f"{lora_B.shape[1]}; the two halves come from different adapters"
            )
        if not config.targets(module):
            # PEFT ignores weights its config does not place; doing the same keeps logits equal.
            log.warning("%s: module %r is not among the config's target_modules; its weights are ignored", file, module)
            continue
        expected_rank = config.rank_for(module)
        if lora_A.shape[0] != expected_rank:
            raise ShapeMismatchError(
                f"{file}: module {module!r} has rank {lora_A.shape[0]} but the config gives it rank "
                f"{expected_rank} (r / rank_pattern); fix adapter_config.json to match the weights"
            )
        tensors[module] = (lora_A, lora_B)
    if not tensors:
        raise AdapterConfigError(f"{file} holds no LoRA weights for the modules its config targets; save the adapter again")
    return AdapterWeights(config, dict(sorted(tensors.items())), source=str(folder), content_hash=files.content_hash)


def load_adapter(
    path: str | Path,
    model_config: ModelConfig,
    *,
    max_rank: int | None = None,
    strict_base: bool = False,
    served_model_name: str | None = None,
    expected_hash: str | None = None,
) -> AdapterWeights:
    """Read and validate an adapter against the base model it will run on. With `expected_hash`
    (recorded when it was registered), files whose bytes have changed since are refused."""
    shapes = linear_shapes(model_config)
    max_dim = max(model_config.vocab_size, *(side for shape in shapes.values() for side in shape))
    budget = WeightBudget(max_tensors=2 * (len(shapes) + 1), max_dim=max_dim, max_rank=max_rank or max_dim)
    if expected_hash is not None and os.path.realpath(path) != str(Path(path).absolute()):
        # A re-read of a registered folder (recorded as its real path) that now leads elsewhere.
        raise LinkedAdapterFileError(
            f"{path} was moved or replaced by a symbolic link since the adapter was registered; load it again"
        )
    weights = read_adapter(path, budget)
    file = Path(weights.source) / WEIGHTS_FILE
    if expected_hash is not None and weights.content_hash != expected_hash:
        raise AdapterChangedError(
            f"{weights.source}: the adapter's files changed since it was registered; load it again to serve the new files"
        )
    for module, (lora_A, lora_B) in weights.tensors.items():
        if module not in shapes:
            hint = (
                "LoRA on lm_head is not supported here"
                if module == "lm_head"
                else f"the base has {model_config.num_hidden_layers} layers with modules like {next(iter(shapes))!r}"
            )
            raise UnknownTargetModuleError(
                f"{file}: adapter targets module {module!r}, which the base model does not have ({hint}); "
                "use an adapter trained for this base model"
            )
        in_features, out_features = shapes[module]
        if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
            raise ShapeMismatchError(
                f"{file}: module {module!r} has lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)}, but the "
                f"base module is {in_features} -> {out_features}, so (r, {in_features}) / ({out_features}, r) are "
                "expected; the adapter was trained for a different base model"
            )
        if max_rank is not None and lora_A.shape[0] > max_rank:
            raise RankTooLargeError(
                f"{file}: module {module!r} has rank {lora_A.shape[0]}, above the maximum rank {max_rank}; "
                "raise the maximum rank (--max-rank / --max-lora-rank) or use a lower-rank adapter"
            )
    mismatch = _base_mismatch(weights.config.base_model_name_or_path, model_config, served_model_name)
    if mismatch:
        if strict_base:
            raise BaseModelMismatchError(f"{file}: {mismatch}; drop strict base checking to load it anyway")
        log.warning("%s: %s", weights.source, mismatch)
        weights.warnings.append(mismatch)
    return weights


def save_adapter(path: str | Path, weights: AdapterWeights) -> Path:
    """Write `weights` as a PEFT folder at `path`, atomically: readers see the old folder or
    the new one, never a half-written one."""
    target = Path(path)
    staging = staging_folder(target)
    try:
        write_adapter_files(staging, weights)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_adapter_files(folder: Path, weights: AdapterWeights) -> None:
    """Write the two PEFT files into an existing (private, not yet visible) folder."""
    state = {}
    for module, (lora_A, lora_B) in weights.tensors.items():
        state[f"{KEY_PREFIX}{module}.lora_A.weight"] = lora_A.detach().float().contiguous().cpu()
        state[f"{KEY_PREFIX}{module}.lora_B.weight"] = lora_B.detach().float().contiguous().cpu()
    _write_durably(folder / CONFIG_FILE, (json.dumps(weights.config.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    _fsync(folder / WEIGHTS_FILE)


def _parse_config(file: Path, data: bytes) -> LoraConfig:
    try:
        raw = json.loads(data)
    except UnicodeDecodeError as err:
        raise AdapterConfigError(f"{file} is not UTF-8 text ({err}); save the adapter again") from None
    except json.JSONDecodeError as err:
        raise AdapterConfigError(f"{file} is not valid JSON ({err}); save the adapter again") from None
    try:
        return LoraConfig.from_dict(raw)
    except (AdapterConfigError, UnsupportedAdapterError) as err:
        raise type(err)(f"{file}: {err}") from None


def _adapter_folder(path: Path) -> Path:
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter folder {path} does not exist; pass a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


def _parse_key(file: Path, key: str) -> tuple[str, str]:
    for fragment, message in _UNSUPPORTED_KEYS.items():
        if fragment in key:
            raise UnsupportedAdapterError(f"{file}: tensor {key!r}: {message}")
    name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
    match = _LORA_KEY.match(name)
    if match is None:
        raise UnsupportedAdapterError(
            f"{file}: tensor {key!r} is not a LoRA weight ({KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight); "
            "only plain LoRA adapters load here"
        )
    return match.group("module"), match.group("half")


def _base_mismatch(recorded: str | None, model_config: ModelConfig, served_model_name: str | None) -> str | None:
    """A message when the adapter records a base other than the served one (advisory)."""
    if not recorded:
        return None
    ours = [n for n in (served_model_name, model_config.name_or_path) if n]
    if not ours:
        return None

    def short(name: str) -> str:
        return Path(str(name).rstrip("/")).name.lower()

    if any(recorded == name or short(recorded) == short(name) for name in ours):
        return None
    return f"adapter was trained on base model {recorded!r}, the served model is {ours[0]!r}"


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())
