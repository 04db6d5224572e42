"""Errors that carry a one-line, user-facing message.

Every error the library raises on bad input is a :class:`SurgeryError`: its message says what is
wrong and what to do about it, so the CLI can print it as-is (no traceback).

Every error class lives here, so any layer can raise and catch them without importing another stage.
"""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class: bad input or an unsupported model, with a message meant for the user.

    The message is kept on one line: a line break that came in with user input (a CSV header, a
    plan key) is shown as ``\\n``, so the CLI's one-line error stays one line.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str):
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message, *args)


class CheckpointError(SurgeryError):
    """A checkpoint file is missing, unreadable, corrupt, or would need to run code to load."""


class ArchitectureError(SurgeryError):
    """The weights do not match the given (or any known) open_clip architecture."""


class UnsupportedTowerError(SurgeryError):
    """A tower that surgery cannot handle (ResNet, ConvNeXt/timm, Hugging Face text towers, ...)."""


class HeadMaskError(SurgeryError, ValueError):
    """A head mask of the wrong shape, dtype or device."""


class DataError(SurgeryError, ValueError):
    """Bad input data or parameters; the message says what is wrong and what to do."""


class PlanError(SurgeryError, ValueError):
    """A plan that is malformed or does not fit the model."""


class ProbeError(SurgeryError):
    """Bad input to a linear probe."""


class ExportParityError(SurgeryError):
    """ONNX Runtime's output differs from PyTorch's by more than the bound."""


class QuantizationGateError(SurgeryError):
    """A quantized export moved embeddings, accuracy or bias further from the fp32 export than allowed."""


class UnfusableBlockError(SurgeryError):
    """A transformer block has a part the ORT-fused graph does not express (LayerScale aside)."""


class JudgeError(SurgeryError, ValueError):
    """A judge could not give a verdict: bad options, an unreachable endpoint, or a malformed reply."""


class TextAuditError(SurgeryError, ValueError):
    """Bad input to the text-tower audit."""


class CAVError(SurgeryError, ValueError):
    """Bad prompt sets, features or labels for concept directions."""


class HeadScoreError(SurgeryError, ValueError):
    """Bad input to a head score: shapes, labels, or an option."""


class TextSpanError(SurgeryError, ValueError):
    """Bad TextSpan input: shapes, options, or a description pool that cannot be read."""


class SAEError(SurgeryError, ValueError):
    """A bad SAE configuration, artifact or input."""


class NeuronError(SurgeryError, ValueError):
    """Neuron search cannot give an answer for this input."""


class CacheError(SurgeryError, ValueError):
    """An activation cache that is missing, damaged, or made from another model."""
