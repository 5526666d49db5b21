"""The LMTP head: Postfix hands mail over LMTP, each recipient gets its own verdict."""
