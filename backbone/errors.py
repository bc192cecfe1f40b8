"""Errors raised while loading a model; each message names the file and the fix."""


class ModelLoadError(ValueError):
    """A model folder or file cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The config names an architecture (or a feature of one) we do not implement."""
