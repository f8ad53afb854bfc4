"""The errors the package raises on purpose, under one base, so callers catch what the core raises.

`GagaError` is the base. `InputError` refuses bad input with a message that says what is accepted;
it is also a ValueError, as every such refusal was before the base existed, so code that catches
ValueError and the nodes' guard (which prints a ValueError's message without its type) behave as
they did. `UnavailableError` says that something the work needs (a device, a configured backend)
is not there; it is also a RuntimeError, as the capture errors were.
"""

from __future__ import annotations


class GagaError(Exception):
    """Base of every error this package raises on purpose; its message says what went wrong."""


class InputError(GagaError, ValueError):
    """Input that is refused; the message says what is wrong and what is accepted."""


class UnavailableError(GagaError, RuntimeError):
    """Something the work needs is not there or not ready (a webcam, a configured backend)."""
