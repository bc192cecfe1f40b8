"""The training config (YAML or JSON): dataclasses whose field docs are also `train --help`.

Validation names the bad key by its path (`tasks[1].adapter.r`) and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.eval_metrics import METRICS


class ConfigError(ValueError):
    """The training config has a missing, unknown or invalid key."""


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (shown by `loraplex train --help`)."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class AdapterSettings:
    r: int = doc("LoRA rank", default=8)
    alpha: float = doc("LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rslora)", default=16.0)
    targets: list[str] | str = doc("modules to adapt: names like [q_proj, v_proj] or 'all-linear'",
                                   default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = doc("LoRA dropout on the adapter's input while training, in [0, 1), e.g. 0.05", default=0.0)
    rslora: bool = doc("rank-stabilised scale alpha / sqrt(r)", default=False)
    init_from: str | None = doc("a PEFT adapter folder to start from (its own r/alpha/targets then apply)", default=None)
    frozen: bool = doc("keep this adapter fixed (requires init_from); its files are never rewritten", default=False)


@dataclass
class TaskSettings:
    name: str = doc("task name: the adapter's folder name and the served task id")
    train: str | None = doc("training JSONL file (not needed for a frozen task)", default=None)
    eval: str | None = doc("evaluation JSONL file (optional)", default=None)
    format: str = doc("data format: instruction | chat | prompt_completion", default="instruction")
    weight: float | None = doc("sampling weight (sampling.strategy: weights)", default=None)
    negatives: int = doc("classification tasks: negative (wrong-label) samples per training record, 0 = none", default=0)
    adapter: AdapterSettings = doc("this task's adapter settings", default_factory=AdapterSettings)


@dataclass
class DataSettings:
    max_length: int = doc("longest example in tokens", default=512)
    overlong: str = doc("over-long examples: truncate (keep the first max_length tokens) | drop", default="truncate")
    clean: bool = doc("normalise text: unicode NFC, control characters removed, spaces collapsed", default=False)
    dedupe: bool = doc("drop exact duplicates (case and spacing ignored)", default=False)
    near_duplicate_threshold: float | None = doc("drop near duplicates at this MinHash Jaccard of word 3-shingles, e.g. 0.8", default=None)
    min_words: int = doc("drop records with fewer words", default=0)
    max_words: int | None = doc("drop records with more words", default=None)
    max_repetition: float | None = doc("drop records whose word 3-grams repeat more than this share, e.g. 0.5", default=None)


@dataclass
class SamplingSettings:
    strategy: str = doc("task mix: proportional | temperature | weights | cap", default="proportional")
    temperature: float = doc("temperature T for p_i ∝ n_i^(1/T)", default=2.0)
    cap: int | None = doc("T5-style cap K for p_i ∝ min(n_i, K)", default=None)


@dataclass
class BatchingSettings:
    batch_tokens: int = doc("token budget per micro-batch (rows x longest row)", default=4096)
    accumulation: int = doc("micro-batches per optimiser step", default=1)


@dataclass
class OptimizerSettings:
    lr: float = doc("peak learning rate", default=2e-4)
    weight_decay: float = doc("AdamW decoupled weight decay (none on biases/norms)", default=0.0)
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.999])
    eps: float = doc("AdamW epsilon", default=1e-8)
    layer_decay: float = doc("LR factor per decoder layer down from the top (1 = off)", default=1.0)
    clip_norm: float | None = doc("clip the global gradient norm to this (null = off)", default=1.0)


@dataclass
class ScheduleSettings:
    kind: str = doc("after warm-up: cosine | linear | constant", default="cosine")
    warmup_steps: int = doc("linear warm-up steps", default=0)
    max_steps: int = doc("optimiser steps to train", default=100)
    min_lr_ratio: float = doc("LR floor as a fraction of the peak", default=0.0)


@dataclass
class SurgerySettings:
    method: str = doc("gradient surgery on the shared adapter: none | pcgrad | gradvac | cagrad", default="pcgrad")
    gradvac_beta: float = doc("GradVac EMA rate of the cosine targets", default=0.01)
    c: float = doc("CAGrad radius in [0, 1): how far the update may leave the mean gradient (0 = plain sum)", default=0.5)


@dataclass
class EvalSettings:
    every: int = doc("evaluate every N steps (0 = only at the end)", default=0)
    patience: int = doc("stop after this many evaluations without a better mean eval loss (0 = never)", default=0)
    max_examples: int | None = doc("evaluate on at most this many examples per task", default=None)
    metrics: dict[str, str] | None = doc(
        "task -> metric (exact_match, accuracy, macro_f1, chrf, bleu, rouge_l, ...): at the end, the final adapters "
        "and the base answer each such task's eval file and `loraplex eval`'s report goes to <output_dir>/eval/",
        default=None,
    )


@dataclass
class CheckpointSettings:
    every: int = doc("checkpoint every N steps (0 = off)", default=0)
    keep: int = doc("checkpoints kept (oldest removed)", default=2)


@dataclass
class TrainConfig:
    model: str = doc("base model: 'default' or a Hugging Face folder")
    output_dir: str = doc("where adapters, checkpoints, the log and plots go")
    tasks: list[TaskSettings] = doc("the tasks; each trains its own adapter")
    shared: AdapterSettings | None = doc("an adapter every task trains (gradient surgery applies to it)", default=None)
    data: DataSettings = doc("tokenization limits", default_factory=DataSettings)
    sampling: SamplingSettings = doc("how tasks mix in batches", default_factory=SamplingSettings)
    batching: BatchingSettings = doc("micro-batches and accumulation", default_factory=BatchingSettings)
    optimizer: OptimizerSettings = doc("AdamW", default_factory=OptimizerSettings)
    schedule: ScheduleSettings = doc("learning-rate schedule and length", default_factory=ScheduleSettings)
    surgery: SurgerySettings = doc("gradient surgery", default_factory=SurgerySettings)
    eval: EvalSettings = doc("evaluation and early stopping", default_factory=EvalSettings)
    checkpoint: CheckpointSettings = doc("checkpoints for --resume", default_factory=CheckpointSettings)
    seed: int = doc("seed of initialisation, sampling and surgery orders", default=0)
    device: str | None = doc("auto | cpu | cuda | cuda:N (`loraplex train` default: auto; --device overrides)", default=None)
    dtype: str | None = doc("the frozen base's dtype: auto | float32 | bfloat16 | float16 (`loraplex train` default: "
                            "auto; --dtype overrides); LoRA weights and optimizer state are always float32", default=None)
    progress: bool = doc("show a progress bar", default=True)
    plots: bool = doc("write PNG plots at the end", default=True)

    def validate(self) -> None:
        _choice("data.overlong", self.data.overlong, ("truncate", "drop"))
        _choice("sampling.strategy", self.sampling.strategy, ("proportional", "temperature", "weights", "cap"))
        _choice("schedule.kind", self.schedule.kind, ("cosine", "linear", "constant"))
        _choice("surgery.method", self.surgery.method, ("none", "pcgrad", "gradvac", "cagrad"))
        if not 0 <= self.surgery.c < 1:
            raise ConfigError(f"surgery.c must be in [0, 1), got {self.surgery.c}; 0.5 is CAGrad's usual value")
        _positive("schedule.max_steps", self.schedule.max_steps)
        _positive("batching.batch_tokens", self.batching.batch_tokens)
        _positive("batching.accumulation", self.batching.accumulation)
        _positive("data.max_length", self.data.max_length)
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.optimizer.lr}; e.g. 2e-4")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}")
        if len(self.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas must be two numbers like [0.9, 0.999], got {self.optimizer.betas}")
        if not self.tasks:
            raise ConfigError("tasks is empty; list at least one task with a name and a train file")
        names = [t.name for t in self.tasks]
        for index, task in enumerate(self.tasks):
            where = f"tasks[{index}]"
            if names.count(task.name) > 1:
                raise ConfigError(f"{where}.name {task.name!r} is used twice; task names must be unique")
            if task.name == "shared" or not task.name or "/" in task.name:
                raise ConfigError(f"{where}.name {task.name!r} is not usable as a folder name; pick another")
            _choice(f"{where}.format", task.format, ("instruction", "chat", "prompt_completion"))
            _check_adapter(f"{where}.adapter", task.adapter)
            if not task.adapter.frozen and not task.train:
                raise ConfigError(f"{where}.train is missing; give a JSONL file, or set adapter.frozen: true with init_from")
        if all(t.adapter.frozen for t in self.tasks):
            raise ConfigError("every task is frozen: nothing to train; unfreeze a task or add a new one")
        if self.shared is not None:
            _check_adapter("shared", self.shared)
        for name, metric in (self.eval.metrics or {}).items():
            task = next((t for t in self.tasks if t.name == name), None)
            if task is None:
                raise ConfigError(f"eval.metrics names task {name!r}, which is not in tasks; tasks: {', '.join(names)}")
            if not task.eval:
                raise ConfigError(f"eval.metrics.{name}: task {name!r} has no eval file to measure; set tasks[].eval")
            if task.adapter.frozen:
                raise ConfigError(f"eval.metrics.{name}: task {name!r} is frozen, so this run writes no adapter for it")
            _choice(f"eval.metrics.{name}", metric, METRICS)


def _check_adapter(where: str, adapter: AdapterSettings) -> None:
    if adapter.r <= 0:
        raise ConfigError(f"{where}.r must be a positive integer, got {adapter.r}; e.g. r: 8")
    if not 0 <= adapter.dropout < 1:
        raise ConfigError(f"{where}.dropout must be in [0, 1), got {adapter.dropout}; e.g. dropout: 0.05 (0 = off)")
    if adapter.frozen and not adapter.init_from:
        raise ConfigError(f"{where}.frozen needs {where}.init_from (the adapter folder to keep fixed)")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}; pick one of them")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


# ---- building dataclasses from plain data ---------------------------------------------------


def _is_dataclass_type(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if _is_dataclass_type(kind):
        return build(kind, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_kind, item = typing.get_args(kind)
        return {_convert(k, key_kind, where): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}; fix its value")


def build(cls: type, raw: Any, where: str = "") -> Any:
    """An instance of dataclass `cls` from a dict, naming unknown, missing and mistyped keys."""
    label = where or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {_join(where, key)!r}; valid keys there: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        path = _join(where, name)
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {path!r}: {spec.metadata.get('doc', '')}")
            continue
        values[name] = _convert(raw[name], hints[name], path)
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or JSON config; relative data paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML or JSON training config")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    config = build(TrainConfig, raw)
    config.validate()
    base = path.parent
    resolve = lambda p: p if p is None or Path(p).is_absolute() else str(base / p)  # noqa: E731
    for task in config.tasks:
        task.train, task.eval = resolve(task.train), resolve(task.eval)
        task.adapter.init_from = resolve(task.adapter.init_from)
    if config.shared is not None:
        config.shared.init_from = resolve(config.shared.init_from)
    config.output_dir = resolve(config.output_dir)
    if config.model != "default" and not Path(config.model).is_absolute() and (base / config.model).exists():
        config.model = str(base / config.model)
    return config


def config_reference() -> str:
    """Every field with its type, default and doc: the epilog of `loraplex train --help`."""
    lines = ["config fields (YAML or JSON):"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            kind = hints[spec.name]
            nested = [k for k in (typing.get_args(kind) or (kind,)) if _is_dataclass_type(k)]
            if spec.default is not dataclasses.MISSING:
                default = f" (default {spec.default!r})"
            elif spec.default_factory is not dataclasses.MISSING and not nested:
                default = f" (default {spec.default_factory()!r})"
            else:
                default = "" if nested or spec.default_factory is not dataclasses.MISSING else " (required)"
            lines.append(f"  {prefix}{spec.name}: {spec.metadata.get('doc', '')}{default}")
            if nested:
                suffix = "[]." if typing.get_origin(kind) is list else "."
                walk(nested[0], f"{prefix}{spec.name}{suffix}")

    walk(TrainConfig, "")
    return "\n".join(lines)
