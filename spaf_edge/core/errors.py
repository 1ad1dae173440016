"""Error types. Every message names the problem and the fix.

Torch-free: the runtime raises these too.
"""


class SpAFError(Exception):
    """Base class for every error SpAF edge raises on purpose."""


class ConfigError(SpAFError, ValueError):
    """An invalid setting (config file, CLI option or API argument)."""


class UnsupportedArchitectureError(SpAFError):
    """The base model's architecture is not in the registry."""


class ModelNotFoundError(SpAFError, FileNotFoundError):
    """A base model, checkpoint or export folder is missing or incomplete."""


class CheckpointMismatchError(SpAFError):
    """SpAF components were trained for a different base model or config."""


class ContextLengthError(SpAFError, ValueError):
    """Prompt plus requested tokens do not fit in the context."""


class ExportFormatError(SpAFError):
    """An export folder is corrupt, incomplete or inconsistent with its manifest."""


class ProviderUnavailableError(SpAFError):
    """The requested ONNX Runtime execution provider is not installed."""


class StorageError(SpAFError, OSError):
    """A file or folder cannot be written: no disk space, no permission, a read-only file system."""


class NonFiniteWeightsError(SpAFError, ValueError):
    """Model weights hold NaN or inf (a diverged training run, or a cast out of range)."""
