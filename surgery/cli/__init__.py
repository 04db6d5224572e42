"""Layer 7: the ``clipsurgery`` command line (click); each command parses options and calls the library.
"""
from __future__ import annotations

