"""The CLI's error boundary, shared by every command group."""
from __future__ import annotations

import functools

import click

from surgery.errors import SurgeryError


def user_errors(fn):
    """Turn library errors into click errors: one line, non-zero exit, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper
