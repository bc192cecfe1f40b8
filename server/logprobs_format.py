"""Token logprobs in the two shapes OpenAI clients read: chat's `content` list and the legacy
completions' parallel lists.

Token text is each id decoded on its own with special tokens shown (`<|im_end|>`), as vLLM writes
it; a byte-level token that holds part of a multi-byte character reads as U+FFFD. `text_offset`
is the cumulative length of those token texts, also as vLLM computes it. A logprob that is not a
finite number (a token the model rules out entirely) is written as -9999.0, since JSON has no
-infinity.
"""

from __future__ import annotations

import math

from backbone.tokenizer import Tokenizer
from server.logprobs import TokenLogprob
from server.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

NOT_FINITE_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NOT_FINITE_LOGPROB


class TokenTexts:
    """Each token id's text, decoded once per response."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = texts(token_id)
        return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode("utf-8")))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(**top(entry.token_id, entry.logprob).model_dump(), top_logprobs=[top(*pair) for pair in entry.top])
            for entry in entries
        ]
    )


def completion_logprobs(
    tokens: list[tuple[int, TokenLogprob | None]],  # (token id, its logprob; None for the first prompt token)
    texts: TokenTexts,
    offset: int = 0,  # text_offset of the first token: where these tokens' text starts in the choice's text
) -> tuple[CompletionLogprobs, int]:
    """The legacy shape, and the text_offset after its last token (where a stream's next chunk
    starts). Each position's `top_logprobs` holds its alternatives and the chosen token
    itself (as vLLM, so a reader can compare the two, e.g. to tell a greedy continuation)."""
    shape = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, entry in tokens:
        text = texts(token_id)
        shape.tokens.append(text)
        shape.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            shape.token_logprobs.append(None)
            shape.top_logprobs.append(None)
            continue
        shape.token_logprobs.append(finite(entry.logprob))
        top: dict[str, float] = {}
        for token, logprob in entry.top:
            top.setdefault(texts(token), finite(logprob))  # two ids may read alike: keep the likelier
        top.setdefault(text, finite(entry.logprob))
        shape.top_logprobs.append(top)
    return shape, offset
