"""Reading request bodies: size-capped, JSON objects, multipart image files. Every refusal is a
:class:`RequestError` (4xx, one line)."""
from __future__ import annotations

import json

from starlette.requests import Request

from surgery.serve.limits import RequestError, ServeLimits, check_count


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refused with 413 past ``max_body_bytes`` (from Content-Length, or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "Content-Length is not a number", "invalid_header")
        if int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"the body is {int(declared):,} bytes; at most {limits.max_body_bytes:,}",
                               "body_too_large", {"Connection": "close"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestError(413, f"the body is over {limits.max_body_bytes:,} bytes", "body_too_large",
                               {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request, limits: ServeLimits) -> dict:
    if media_type(request) != "application/json":
        raise RequestError(415, f"content type {media_type(request) or '(none)'!r} is not accepted here; send "
                                "application/json", "unsupported_media_type")
    body = await read_body(request, limits)
    if not body:
        raise RequestError(400, "the body is empty; send a JSON object", "empty_body")
    try:
        data = json.loads(body)
    except RecursionError:  # the C parser's guard against deep nesting ([[[[...: a 16 MB body nests 8 million deep)
        raise RequestError(400, "the body is JSON nested too deeply; send a flat JSON object", "invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})",
                           "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object", "invalid_json")
    return data


def field(data: dict, name: str):
    if name not in data:
        raise RequestError(400, f"missing field '{name}'", "missing_field")
    return data[name]


async def multipart_files(request: Request, limits: ServeLimits) -> list[bytes]:
    """The request's files, in order. A part that is not a file is refused (400): the answer has one
    row per item sent, so an item that would be skipped is an error, never a missing row."""
    body = await read_body(request, limits)
    if not body:
        raise RequestError(400, "the body is empty; send one or more image files", "empty_body")
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_items, max_fields=limits.max_items)
    except Exception as exc:  # noqa: BLE001 - python-multipart / Starlette parse errors vary by version
        raise RequestError(400, f"the multipart body cannot be parsed ({str(exc)[:200]})", "invalid_multipart") from None
    try:
        items = form.multi_items()
        for i, (name, value) in enumerate(items):
            if not hasattr(value, "read"):
                raise RequestError(400, f"form part {i} ('{name[:100]}') is a field, not a file; send every image as "
                                        "a file part (each item sent gets one row)", "invalid_multipart")
        check_count(len(items), "image files", limits)
        return [await value.read() for _, value in items]
    finally:
        await form.close()  # the parser's spooled temporary files
