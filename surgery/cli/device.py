"""``--device`` for the commands that run a model (audit, sae train, sae neurons)."""
from __future__ import annotations

import click

from surgery.model.device import DEVICE_CHOICES


def device_options(f):
    return click.option("--device", default="auto", show_default=True,
                        help=f"Where to run: {' | '.join(DEVICE_CHOICES)} | cuda:N (auto: cuda when available). "
                             "The attention backend follows: triton on CUDA (sdpa without Triton), sdpa on the CPU.")(f)
