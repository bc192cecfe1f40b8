"""From a request's prompt to token ids without stalling the server.

A prompt's size is checked in bytes before it is tokenized: no token covers more than the
longest vocabulary entry's bytes (times a margin for normalizers that drop characters), so text
longer than that bound times the context cannot fit and is refused without tokenizing megabytes.
Templating and tokenization then run in a worker thread, so a long prompt never blocks the event
loop that every other request's stream is served from.
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.concurrency import run_in_threadpool

from backbone.chat_encoding import ChatContentError, chat_encoder
from backbone.tokenizer import Tokenizer
from server.http_errors import ApiError

NORMALIZER_MARGIN = 4  # a normalizer may drop characters (accents, controls), so a token can cover more bytes


@functools.lru_cache(maxsize=8)
def longest_token_bytes(tokenizer: Tokenizer) -> int:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(token.encode("utf-8")) for token in vocab), default=1)


def utf8_size(text: str, param: str) -> int:
    """Bytes of `text` in UTF-8. JSON's \\uXXXX escapes can carry half of a surrogate pair, which
    is no character at all: refuse it by name rather than with the codec's message."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise ApiError(
            400,
            f"{param} contains a lone UTF-16 surrogate (\\u{ord(bad):04x} at character {err.start}), which is not "
            "valid Unicode text; send characters outside the Basic Multilingual Plane as a complete surrogate pair or as UTF-8",
            param=param,
        ) from None


def check_prompt_bytes(size: int, tokenizer: Tokenizer, max_context: int, param: str) -> None:
    limit = max_context * longest_token_bytes(tokenizer) * NORMALIZER_MARGIN
    if size > limit:
        raise ApiError(
            400,
            f"the prompt is {size} bytes, more than can fit the maximum context of {max_context} tokens "
            f"(at most {limit} bytes); shorten the prompt",
            param=param,
            code="context_length_exceeded",
        )


async def chat_prompt_ids(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], max_context: int, raw_special_tokens: bool
) -> list[int]:
    size = sum(utf8_size(str(m.get(field) or ""), "messages") for m in messages for field in ("content", "name"))
    check_prompt_bytes(size, tokenizer, max_context, "messages")
    if raw_special_tokens:
        return await run_in_threadpool(
            lambda: tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        )
    try:
        return await run_in_threadpool(chat_encoder(tokenizer).encode_chat, messages)
    except ChatContentError as err:
        raise ApiError(400, str(err), param="messages") from None


async def text_prompt_ids(tokenizer: Tokenizer, text: str, max_context: int) -> list[int]:
    check_prompt_bytes(utf8_size(text, "prompt"), tokenizer, max_context, "prompt")
    return await run_in_threadpool(tokenizer.encode, text, True)
