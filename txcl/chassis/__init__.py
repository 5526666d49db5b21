"""The chassis every head of `txco serve` plugs into (docs/internals.md, "The chassis").

What is not one head's own lives here, so a second head uses it without importing the LMTP
head: reading `txco.yaml` (`config`), the runtime of compiled stacks (`runtime`), reload,
last-good and the file watcher (`reload`), `status.json` and `txco status` (`status`), the
pre-fork supervisor (`supervisor`), the least-busy-worker accept (`balance`), and the
`Head` protocol a head implements (`head`).
"""
