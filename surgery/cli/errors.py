"""The CLI's error boundary, shared by every command group."""
from __future__ import annotations

import functools

import click

from surgery.errors import SurgeryError
from surgery.io.fs import disk_error_message


def user_errors(fn):
    """Turn library errors into click errors: one line, non-zero exit, no traceback. So is a full or
    read-only disk met while writing (the writers remove their temp files and staging folders)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            message = disk_error_message(exc, exc.filename, atomic=False)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper
