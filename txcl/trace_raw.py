"""Scrubbing the message bytes a trace stores beside its JSON (`message.eml`).

A value the stack's `WITH omit` / `WITH redact` hints scrub from the envelope is also
replaced where its bytes appear in the stored message, so `redact` reaches `msg.raw`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Below this length a value is too common to hunt for in a whole message.
_MIN_SECRET: Final = 8


def scrub_message(message: bytes, secrets: Iterable[str], replacement: str) -> bytes:
    """`message` with every copy of a secret replaced by `replacement`."""
    marker = replacement.encode("utf-8")
    for secret in secrets:
        if len(secret) < _MIN_SECRET:
            continue
        needle = secret.encode("utf-8", "surrogateescape")
        if needle in message:
            message = message.replace(needle, marker)
    return message
