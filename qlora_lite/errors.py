"""The errors qlora-lite raises: one base class, so the CLI turns every one into a message."""

from __future__ import annotations


class QloraLiteError(Exception):
    """A problem the user can fix; the message says what was wrong, where, and what to do."""


class AdapterError(QloraLiteError, ValueError):
    """The adapter folder is missing, malformed, unsupported, or does not fit the base model."""


class CheckpointError(QloraLiteError, RuntimeError):
    """A checkpoint cannot be written, read or resumed from; the message names the file and the fix."""


class ConfigError(QloraLiteError, ValueError):
    """One or more configuration values are invalid; the message lists each of them."""


class DataError(QloraLiteError, ValueError):
    """The data cannot be used; one line per problem, ``FILE:LINE: what is wrong``."""


class DemoError(QloraLiteError, RuntimeError):
    """The demo cannot run (output folder in use, bundled files missing); the message says what to do."""


class LaunchError(QloraLiteError, RuntimeError):
    """The processes cannot be started as asked; the message says why and what to do."""


class MergeError(QloraLiteError, RuntimeError):
    """The merge cannot run (bad paths, adapter does not fit the base); nothing was written."""


class MergeVerificationError(MergeError):
    """A merged tensor differs from W + scale * B @ A beyond rounding, or the folder's probe logits deviate."""


class GGUFExportError(QloraLiteError, ValueError):
    """The model cannot be written as GGUF (unsupported architecture, tokenizer or tensor)."""


class GGUFVerifyError(GGUFExportError):
    """The GGUF file read back differs from what was written (the message lists each difference).

    Attributes:
        problems: one line per difference, e.g. "tensor blk.0.attn_q.weight: type F16, expected Q8_0".
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class LoRATargetError(QloraLiteError, ValueError):
    """The requested target modules match no linear layer of the model."""


class EstimateError(QloraLiteError, ValueError):
    """config.json lacks a size the estimate needs; the message names the file and the key."""


class ModelLoadError(QloraLiteError, RuntimeError):
    """The model folder cannot be loaded; the message says which file and why."""


class OutputError(QloraLiteError, OSError):
    """The output folder cannot be written (read-only, no permission, not a folder)."""


class MetricsError(QloraLiteError, ValueError):
    """The metrics file is missing or holds nothing to draw."""


class SafetensorsError(QloraLiteError, ValueError):
    """A safetensors file is damaged or uses a dtype this reader does not handle."""


class ScalerStateError(QloraLiteError, ValueError):
    """A saved scaler state is damaged or does not fit; the message names the file."""


class TrainingError(QloraLiteError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory); the message says what to do."""
