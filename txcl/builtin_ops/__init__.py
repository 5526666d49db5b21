"""The ops every OPS tree can EXEC without configuration: ARCHIVE, EMIT, WEBHOOK, FORWARD.

Each returns a merge patch under one top-level key named after the op in lower case
(`archive`, `emit`, `webhook`, `forward`), so a rule in a later stage reads, e.g.,
`archive.path`. Each is generic over the envelope's source: it reads `_txc.<src>.*`
where `src` is `_txc.src`. Each module declares its op, with what it reads, as `OP`;
what they share lives in `support`, acting once per delivery in `once` (no op imports
another).
"""

from txcl.builtin_ops import archive, emit, forward, webhook
from txcl.ops import RegisteredOp

BUILTINS: tuple[RegisteredOp, ...] = (archive.OP, emit.OP, forward.OP, webhook.OP)

__all__ = ["BUILTINS"]
