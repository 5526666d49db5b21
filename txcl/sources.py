"""Envelope sources: what `txcl test` knows of the head an envelope came from.

txcl never imports a head. A head registers an object under the entry-point group
`txcl.sources` (the LMTP head: `lmtp = "lmtp.verdicts:SOURCE"`); `txcl test` finds it by the
envelope's `_txc.src` to show the reply lines the head would send, and to build an envelope
from a message for test cases that give an `.eml`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from txcl.envelope import source_of
from txcl.errors import Problem

log = logging.getLogger(__name__)


class Source(Protocol):
    name: str

    def replies(
        self, envelope: Mapping[str, Any], error: Problem | None = None
    ) -> list[tuple[str, str]]:
        """(recipient, reply line) per recipient of the envelope."""
        ...

    def envelope_from_message(
        self, raw: bytes, *, rcpts: Sequence[str], mail_from: str, stack: str, stage: int
    ) -> dict[str, Any]:
        """The envelope the head would build for `raw`, routed to `stack`."""
        ...


@functools.cache
def sources() -> Mapping[str, Source]:
    found: dict[str, Source] = {}
    for entry in importlib.metadata.entry_points(group="txcl.sources"):
        try:
            found[entry.name] = entry.load()
        except Exception as err:  # a broken plug-in must not break `txcl test`
            log.warning("txcl.sources: cannot load %s (%s): %s", entry.name, entry.value, err)
    return found


def source_for(envelope: Any) -> Source | None:
    """The source named by `_txc.src`, if one is installed."""
    src = source_of(envelope)
    return sources().get(src) if src is not None else None
