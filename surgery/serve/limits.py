"""What a request may carry, and the checks that turn bad input into a 4xx JSON answer.

Every check raises :class:`RequestError` (HTTP status, one-line message, a machine-readable code);
the routes turn it into ``{"error": {"message", "type", "code"}}`` and the server keeps answering.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

from surgery.errors import SurgeryError


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx, or 503), a one-line message, a short code."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class ServeLimits:
    max_body_bytes: int = 16 * 1024 * 1024  # request body, bytes (413 above)
    max_image_pixels: int = 40_000_000  # width x height of one image, read from its header before decoding (413)
    max_text_chars: int = 4096  # characters of one text (413); CLIP reads at most its context (77 tokens) anyway
    max_items: int = 256  # images or texts in one request (413); at most the batcher's max_queue
    retry_after_s: int = 1  # the Retry-After header of a 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_text_chars", "max_items", "retry_after_s"):
            if getattr(self, name) < 1:
                raise SurgeryError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")


def check_count(n: int, what: str, limits: ServeLimits) -> None:
    if n == 0:
        raise RequestError(400, f"no {what} in the request; send at least one", "empty_input")
    if n > limits.max_items:
        raise RequestError(413, f"{n} {what} in one request; at most {limits.max_items}: split the request",
                           "too_many_items")


def check_texts(texts: object, field: str, limits: ServeLimits) -> list[str]:
    """A non-empty list of strings, each at most ``max_text_chars`` long."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise RequestError(400, f"'{field}' must be a string or a list of strings", "invalid_field")
    check_count(len(texts), "texts", limits)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"'{field}'[{i}] is a {type(text).__name__}, not a string (token arrays are not "
                                    "accepted: send the text)", "invalid_field")
        if len(text) > limits.max_text_chars:
            raise RequestError(413, f"'{field}'[{i}] has {len(text)} characters; at most {limits.max_text_chars}",
                               "text_too_long")
    return texts


def decode_base64(items: object, field: str, limits: ServeLimits) -> list[bytes]:
    if not isinstance(items, list):
        raise RequestError(400, f"'{field}' must be a list of base64 strings", "invalid_field")
    check_count(len(items), "images", limits)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(400, f"'{field}'[{i}] must be a base64 string", "invalid_field")
        if item.startswith("data:") and "," in item:  # a data URL: data:image/png;base64,....
            item = item.split(",", 1)[1]
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"'{field}'[{i}] is not valid base64", "invalid_base64") from None
    return out


def open_image(data: bytes, index: int, limits: ServeLimits) -> Image.Image:
    """Decode one image after checking its pixel count from the header (decompression bombs are
    refused before a single pixel is decoded). Returns an RGB PIL image."""
    if not data:
        raise RequestError(400, f"image {index} is empty (0 bytes)", "invalid_image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError:  # PIL's own guard (over twice its MAX_IMAGE_PIXELS) fired first
        raise RequestError(413, f"image {index} has too many pixels; at most {limits.max_image_pixels:,} pixels: "
                                "downscale it first", "image_too_large") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(400, f"image {index} cannot be read ({_reason(exc)}); send a PNG, JPEG or WebP file",
                           "invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"image {index} is {width} x {height} pixels; at most {limits.max_image_pixels:,} "
                                "pixels: downscale it first", "image_too_large")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(400, f"image {index} cannot be decoded ({_reason(exc)}); the file is corrupt or truncated",
                           "invalid_image") from None


def _reason(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
