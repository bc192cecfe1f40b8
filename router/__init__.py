"""Which adapter serves a request: task table, aliases and versions, A/B arms, resident slots."""
