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
from surgery.io.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageTooLarge, check_image_size, open_image


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx, or 503), a one-line message, a short code."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class ServeLimits:
    max_body_bytes: int = 16 * 1024 * 1024  # request body, bytes (413 above)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # width x height of one image, from its header before decoding (413)
    # long side / short side of one image, from its header (413): the transform resizes the short side to the
    # model's size, so a 1 x 1,000,000 PNG would become 224 x 224,000,000 pixels before its crop
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT
    max_text_chars: int = 4096  # characters of one text (413); CLIP reads at most its context (77 tokens) anyway
    max_items: int = 256  # images or texts in one request (413); at most the batcher's max_queue
    # pixels (from the headers) being decoded at once, over all requests: a request that does not fit now
    # is answered 503, one that could never fit 413; heavy requests (surgery.serve.admission) hold at most 3/4
    # of it together. None: twice max_image_pixels
    max_decode_pixels: int | None = None
    # UTF-8 bytes of text being tokenized at once, over all requests (503 / 413 as above); the default's 3/4
    # holds one request at the item and character limits (256 x 4096 characters of up to 4 bytes: 4 MiB)
    max_text_bytes: int = 6 * 1024 * 1024
    retry_after_s: int = 1  # the Retry-After header of a 503

    def __post_init__(self) -> None:
        if self.max_decode_pixels is None:
            self.max_decode_pixels = 2 * self.max_image_pixels
        for name in ("max_body_bytes", "max_image_pixels", "max_text_chars", "max_items", "max_decode_pixels",
                     "max_text_bytes", "retry_after_s"):
            if getattr(self, name) < 1:
                raise SurgeryError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")
        if not self.max_aspect_ratio >= 1:
            raise SurgeryError(f"serve limit max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_decode_pixels * 3 < self.max_image_pixels * 4:  # heavy requests hold at most 3/4 of it
            raise SurgeryError(f"serve limit max_decode_pixels ({self.max_decode_pixels:,}) is below 4/3 of "
                               f"max_image_pixels ({self.max_image_pixels:,}): an image the server accepts could never "
                               "be decoded")


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
        if not text.strip():
            raise RequestError(400, f"'{field}'[{i}] is empty; send text to embed", "empty_input")
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


def image_size(data: bytes, index: int, limits: ServeLimits) -> tuple[int, int]:
    """``(width, height)`` of one encoded image, from its header alone, after the size checks
    (pixels and aspect ratio: :func:`surgery.io.images.check_image_size`). Nothing is decoded."""
    if not data:
        raise RequestError(400, f"image {index} is empty (0 bytes)", "invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own guard (over twice its MAX_IMAGE_PIXELS) fired first
        raise RequestError(413, f"image {index} has too many pixels; at most {limits.max_image_pixels:,} pixels: "
                                "downscale it first", "image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, f"image {index} cannot be read ({_reason(exc)}); send a PNG, JPEG or WebP file",
                           "invalid_image") from None
    try:
        check_image_size(width, height, limits.max_image_pixels, limits.max_aspect_ratio)
    except ImageTooLarge as exc:
        raise RequestError(413, f"image {index} is refused: {exc}", "image_too_large") from None
    return width, height


def decode_image(data: bytes, index: int, limits: ServeLimits) -> Image.Image:
    """Decode one image through the shared decode path (:func:`surgery.io.images.open_image`, which
    checks the header again before any pixel is decoded). Returns an RGB PIL image."""
    try:
        return open_image(data, limits.max_image_pixels, max_aspect=limits.max_aspect_ratio)
    except ImageTooLarge as exc:
        raise RequestError(413, f"image {index} is refused: {exc}", "image_too_large") from None
    except Image.DecompressionBombError:
        raise RequestError(413, f"image {index} has too many pixels; at most {limits.max_image_pixels:,} pixels: "
                                "downscale it first", "image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError(400, f"image {index} cannot be decoded ({_reason(exc)}); the file is corrupt or truncated",
                           "invalid_image") from None


def _reason(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
