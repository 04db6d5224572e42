"""Errors that carry a one-line, user-facing message.

Every error the library raises on bad input is a :class:`SurgeryError`: its message says what is
wrong and what to do about it, so the CLI can print it as-is (no traceback).
"""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class: bad input or an unsupported model, with a message meant for the user."""


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
