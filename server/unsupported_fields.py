"""Refusals, by name, of request fields the server reads but does not implement.

A client that sets `logit_bias` or `tools` expects them to change the answer; serving the request
as if they were absent would hand back a plausible but wrong completion. So each such field is a
400 naming it, unless it holds the value that means "off" (what OpenAI's clients send by default).
"""

from __future__ import annotations

from typing import Any

from server.http_errors import ApiError
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


def _off(value: Any, *neutral: Any) -> bool:
    return value is None or any(value == n and type(value) is type(n) for n in neutral)


# field -> (is the value harmless?, how to fix it)
_RULES: dict[str, tuple[Any, str]] = {
    "presence_penalty": (lambda v: v == 0, "send 0 (or leave it out)"),
    "frequency_penalty": (lambda v: v == 0, "send 0 (or leave it out)"),
    "logit_bias": (lambda v: _off(v, {}), "leave it out"),
    "suffix": (lambda v: _off(v, ""), "leave it out and append the text yourself"),
    "tools": (lambda v: _off(v, []), "leave it out; this server does not call tools"),
    "tool_choice": (lambda v: _off(v, "none"), "leave it out or send \"none\""),
    "functions": (lambda v: _off(v, []), "leave it out; this server does not call functions"),
    "function_call": (lambda v: _off(v, "none"), "leave it out or send \"none\""),
    "response_format": (lambda v: _off(v) or v == {"type": "text"}, "leave it out or send {\"type\": \"text\"}"),
    "min_tokens": (lambda v: _off(v, 0), "leave it out or send 0"),
    "repetition_penalty": (lambda v: _off(v, 1, 1.0), "leave it out or send 1"),
    "min_p": (lambda v: _off(v, 0, 0.0), "leave it out or send 0"),
    "stop_token_ids": (lambda v: _off(v, []), "leave it out and use `stop` strings"),
    "ignore_eos": (lambda v: _off(v, False), "leave it out or send false"),
    "use_beam_search": (lambda v: _off(v, False), "leave it out or send false"),
    "prompt_logprobs": (lambda v: _off(v), "send echo=true with logprobs=N on /v1/completions instead"),
}


def refuse_unsupported(body: SamplingFields) -> None:
    """Raise a 400 naming the first field set to something this server does not implement."""
    for name, (harmless, fix) in _RULES.items():
        value = getattr(body, name)
        if not harmless(value):
            raise ApiError(400, f"{name}={_shown(value)} is not supported; {fix}", param=name, code="unsupported_parameter")
    if isinstance(body, CompletionRequest) and not _off(body.best_of, 1, body.n):
        raise ApiError(
            400, f"best_of={_shown(body.best_of)} is not supported; leave it out and ask for n choices instead",
            param="best_of", code="unsupported_parameter",
        )  # fmt: skip
    if isinstance(body, ChatCompletionRequest) and not _off(body.echo, False):
        raise ApiError(
            400, "echo is not supported on chat; prepend the last message yourself, or use /v1/completions with echo",
            param="echo", code="unsupported_parameter",
        )  # fmt: skip
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true; send both", param="top_logprobs")
    if isinstance(body, CompletionRequest) and body.top_logprobs is not None:
        raise ApiError(400, "top_logprobs is a chat field; on /v1/completions send logprobs=N", param="top_logprobs")
    if isinstance(body, CompletionRequest) and body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens=0 generates nothing; send max_tokens >= 1, or echo=true with logprobs to score the prompt",
            param="max_tokens",
        )  # fmt: skip


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
