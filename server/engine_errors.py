"""Why the engine refuses a request or an adapter operation. The HTTP layer maps each type to a
status code in one place; every message names the bad value and what to do about it."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of the engine's refusals."""


class QueueFullError(EngineError):
    """The waiting queue is at `max_queued`; the request is refused at once rather than queued."""

    def __init__(self, max_queued: int) -> None:
        super().__init__(
            f"the request queue is full ({max_queued} waiting); retry later or raise max_queued"
        )
        self.max_queued = max_queued


class TenantQueueFullError(QueueFullError):
    """The tenant already has its limit of waiting requests; other tenants are still served."""

    def __init__(self, tenant: str, max_queued: int) -> None:
        EngineError.__init__(
            self,
            f"tenant {tenant!r} already has {max_queued} requests waiting, its limit; retry once some "
            "have finished or ask an administrator to raise max_queued on the key",
        )
        self.max_queued = max_queued


class PromptTooLongError(EngineError, ValueError):
    """prompt + max_tokens exceeds the context the engine serves."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, together "
            f"{prompt_tokens + max_tokens} > the maximum context of {max_context} tokens; "
            "shorten the prompt or lower max_tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_context = max_context


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (empty prompt, token id outside the vocabulary)."""


class UnknownAdapterError(EngineError, LookupError):
    """No adapter is registered under the name."""

    def __init__(self, name: str) -> None:
        # No listing of the registered names: a tenant must not learn other tenants' adapters.
        super().__init__(
            f"no adapter named {name!r} is registered; "
            "load it first (POST /v1/load_lora_adapter) or use the base model"
        )
        self.name = name


class AdapterSupersededError(EngineError):
    """A registration finished after a newer one of the same name, so it never became current."""

    def __init__(self, name: str, version: int, current: int) -> None:
        super().__init__(
            f"adapter {name!r} version {version} was superseded by version {current}, registered while it "
            f"loaded; version {current} serves requests. Load it again if it should replace that one"
        )


class EngineStoppedError(EngineError):
    """The engine has shut down and takes no more requests."""

    def __init__(self) -> None:
        super().__init__("the engine has shut down; restart the server to serve requests")
