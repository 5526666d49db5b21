"""The ops every OPS tree can EXEC without configuration: ARCHIVE, EMIT, WEBHOOK, FORWARD.

Each returns a merge patch under one top-level key named after the op in lower case
(`archive`, `emit`, `webhook`, `forward`), so a rule in a later stage reads, e.g.,
`archive.path`. Each is generic over the envelope's source: it reads `_txc.<src>.*`
where `src` is `_txc.src`.
"""

from txcl.builtin_ops import archive, emit, forward, webhook
from txcl.ops import Op

BUILTIN_OPS: dict[str, Op] = {**archive.OPS, **emit.OPS, **webhook.OPS, **forward.OPS}

__all__ = ["BUILTIN_OPS"]
