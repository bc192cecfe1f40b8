"""`LoraConfig`: PEFT's LoRA settings with PEFT's meanings, read from and written to
adapter_config.json, plus the two questions every other module asks of it: which modules an
adapter targets, and each module's rank and scale.

Matching follows peft 0.21 (`check_target_module_exists`, `get_pattern_key`) exactly, quirks
included, because an adapter must mean the same thing here as in PEFT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from backbone.config import ModelConfig
from backbone.model import CausalLM

from adapters import safe_patterns
from adapters.errors import AdapterConfigError, UnsupportedAdapterError
from adapters.module_shapes import model_linear_shapes

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
# PEFT's default targets for Llama-family models when `target_modules` is None.
DEFAULT_TARGETS = ["q_proj", "v_proj"]
# Initialisations that rewrite the base weights: such an adapter only works with its own
# modified base, so its logits here would silently differ.
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# PEFT features that change the forward; a file that turns one on is refused, not misread.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora=true) is not supported; retrain with use_dora=false or merge it with PEFT",
    "lora_bias": "LoRA bias (lora_bias=true) is not supported; retrain with lora_bias=false",
    "fan_in_fan_out": "fan_in_fan_out=true is for GPT-2 Conv1D layers; Llama-family adapters need false",
    "layer_replication": "layer_replication is not supported; use an adapter without it",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported; target modules instead",
    "trainable_token_indices": "trainable_token_indices is not supported; use an adapter without it",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
}


@dataclass
class LoraConfig:
    r: int = 8  # rank of every targeted module unless rank_pattern says otherwise
    lora_alpha: float = 8  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # training only: dropout on the LoRA branch's input
    target_modules: list[str] | str | None = None  # list: name or ".name" suffix; str: regex fullmatch; "all-linear"
    exclude_modules: list[str] | str | None = None  # same matching, applied first
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: A kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r); False: both random
    rank_pattern: dict[str, int] = field(default_factory=dict)  # key regex (PEFT get_pattern_key) -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # key regex -> alpha
    layers_to_transform: list[int] | int | None = None  # only these decoder layers (list targets only, as PEFT)
    layers_pattern: list[str] | str | None = None  # the layer container's name, e.g. "layers"
    bias: str = "none"  # only "none": LoRA never trains the base biases here
    base_model_name_or_path: str | None = None  # advisory (DESIGN decision 3)
    task_type: str | None = "CAUSAL_LM"
    peft_type: str = "LORA"
    modules_to_save: list[str] | None = None  # refused when non-empty: we serve LoRA deltas only
    use_dora: bool = False  # refused when true
    inference_mode: bool = True
    revision: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a specific error for a value PEFT would reject or we do not implement."""
        if str(self.peft_type).upper() != "LORA":
            raise UnsupportedAdapterError(
                f"peft_type {self.peft_type!r} is not supported; only LoRA adapters (peft_type LORA) load here"
            )
        if self.bias != "none":
            raise UnsupportedAdapterError(
                f"bias={self.bias!r} trains the base model's biases, which a shared base cannot hold per adapter; "
                "retrain with bias='none'"
            )
        if self.modules_to_save:
            raise UnsupportedAdapterError(
                f"modules_to_save={self.modules_to_save} replaces whole base modules per adapter, which a shared base "
                "cannot serve; retrain without modules_to_save (or merge that adapter into its own model)"
            )
        if self.use_dora:
            raise UnsupportedAdapterError(UNSUPPORTED_FEATURES["use_dora"])
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"r={self.r!r} must be a positive integer")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern is not None):
            raise AdapterConfigError(
                "layers_to_transform / layers_pattern only apply to a list of target_modules, not to the regex "
                f"{self.target_modules!r}; put the layer numbers into the regex or use a list"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("layers_pattern is set but layers_to_transform is not; give the layer indices too")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise AdapterConfigError(f"rank_pattern[{key!r}]={rank!r} must be a positive integer")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
            raise UnsupportedAdapterError(
                f"init_lora_weights={init!r} adapters need their own modified base model; convert the adapter "
                "with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) first"
            )

    # ---- JSON --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "LoraConfig":
        """Build from adapter_config.json contents; keys we do not use are logged and ignored,
        keys that would change the forward are refused."""
        if not isinstance(raw, Mapping):
            raise AdapterConfigError(f"adapter config must be a JSON object, got {type(raw).__name__}")
        for key, message in UNSUPPORTED_FEATURES.items():
            if key in ("use_dora",):
                continue  # validate() reports it
            if raw.get(key):
                raise UnsupportedAdapterError(message)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            log.debug("adapter config: ignoring keys %s", ", ".join(unknown))
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("rank_pattern", "alpha_pattern"):
            if values.get(key) is None:
                values[key] = {}
        if isinstance(values.get("target_modules"), (set, tuple)):
            values["target_modules"] = sorted(values["target_modules"])
        try:
            return cls(**values)
        except TypeError as err:
            raise AdapterConfigError(f"adapter config has an invalid value: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """PEFT-compatible JSON contents with sorted keys (PEFT's own reader accepts it)."""
        raw = asdict(self)
        if isinstance(raw["target_modules"], list):
            raw["target_modules"] = sorted(raw["target_modules"])
        raw.update(lora_bias=False, fan_in_fan_out=False)
        return dict(sorted(raw.items()))

    # ---- per-module questions ------------------------------------------------------------------

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would put this adapter on `module_name` (a full module path)."""
        if self.exclude_modules and _matches(self.exclude_modules, module_name):
            return False
        targets = DEFAULT_TARGETS if self.target_modules is None else self.target_modules
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                return module_name != "lm_head"
            return safe_patterns.fullmatch(targets, module_name) is not None
        if module_name in targets:
            return True  # exact names skip layers_to_transform, as in PEFT
        if not any(module_name.endswith(f".{target}") for target in targets):
            return False
        return self._in_transformed_layer(module_name)

    def _in_transformed_layer(self, module_name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, list) and not wanted):
            return True
        patterns = self.layers_pattern
        match = None
        if not patterns:
            match = safe_patterns.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = safe_patterns.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return self.alpha_for(module_name) / denominator

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def target_module_names(config: LoraConfig, model: CausalLM | ModelConfig) -> list[str]:
    """The model's linear modules this config targets, in model order."""
    return [name for name in model_linear_shapes(model) if config.targets(name)]


def _matches(patterns: list[str] | str, module_name: str) -> bool:
    if isinstance(patterns, str):
        return safe_patterns.fullmatch(patterns, module_name) is not None
    return module_name in patterns or any(module_name.endswith(f".{p}") for p in patterns)


def _pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key that matches a dotted suffix of the name."""
    for key in patterns:
        if safe_patterns.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
