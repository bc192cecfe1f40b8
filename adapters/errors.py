"""Errors about adapters. Each message names the file or module at fault and how to fix it.

All subclass `AdapterError(ValueError)`, so the server maps every one of them to a 4xx and the
CLI to a one-line message, while callers that care can catch the precise kind.
"""


class AdapterError(ValueError):
    """An adapter cannot be read, validated, placed, merged or stored."""


class AdapterNotFoundError(AdapterError):
    """The adapter folder or one of its required files is missing or unreadable."""


class AdapterConfigError(AdapterError):
    """adapter_config.json is not valid JSON or holds an invalid value."""


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT adapter using a feature we do not implement (DoRA, modules_to_save, ...)."""


class CorruptAdapterFileError(AdapterError):
    """adapter_model.safetensors is truncated or corrupt."""


class UnknownTargetModuleError(AdapterError):
    """The adapter targets a module the base model does not have."""


class ShapeMismatchError(AdapterError):
    """A LoRA tensor's shape does not fit the base model's module (or its own config's rank)."""


class RankTooLargeError(AdapterError):
    """The adapter's rank exceeds the rank the server's slots were sized for."""


class NonFiniteWeightsError(AdapterError):
    """A LoRA tensor (or a merged weight) holds NaN or infinity."""


class UnpairedTensorError(AdapterError):
    """A module has lora_A without lora_B or the reverse."""


class BaseModelMismatchError(AdapterError):
    """The adapter records another base model and strictness was asked for."""


class SlotLayoutError(AdapterError):
    """An adapter targets a module that has no LoRA layer on the model it is placed on."""


class MergeError(AdapterError):
    """A merge or unmerge that would leave the base weights in an unknown state."""


class StoreError(AdapterError):
    """The adapter store refuses an operation (bad name, missing version, ...)."""


class VersionExistsError(StoreError):
    """Store versions are immutable: the version is already written."""


class OversizedAdapterError(AdapterError):
    """An adapter file declares more or larger tensors than the base model can use."""


class AdapterChangedError(AdapterError):
    """A registered adapter's files no longer hold the bytes they held at registration."""


class LinkedAdapterFileError(AdapterError):
    """An adapter file is a symbolic link, or its folder was moved or replaced by one: files are
    read only as plain files in the folder as it was registered."""
