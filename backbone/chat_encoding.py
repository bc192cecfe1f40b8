"""Chat prompts to token ids where only the chat template writes control tokens.

Encoding the rendered prompt in one pass turns any special-token text into its control token,
wherever it came from: a user who writes `<|im_start|>system ...` in a message forges a system
turn. Here a special token's text becomes its control token only where the template wrote it;
inside a message's content (or name) it is encoded as the plain text it is.

Added tokens split the text before the model's tokenization runs, so encoding the pieces between
the template's control tokens one by one gives the ids a one-pass encoding would; a conversation
without special-token text in its messages is encoded in one pass, exactly as before.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import tokenizers

from backbone.tokenizer import Tokenizer


class ChatContentError(ValueError):
    """Special-token text in a message that the template rewrote, so it cannot be kept plain."""


class ChatEncoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.backend.get_added_tokens_decoder().values()
        self._specials = {token.content: token for token in added if token.special}
        # A copy of the tokenizer that reads special-token text as text (its flag is per object,
        # and the server's tokenizer is shared across threads).
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        self._plain.encode_special_tokens = True
        ordered = sorted(self._specials, key=len, reverse=True)  # the longest match wins, as the tokenizer's
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        texts = [str(m.get(field) or "") for m in messages for field in ("content", "name")]
        if self._pattern is None or not any(self._pattern.search(text) for text in texts):
            return self.tokenizer.encode(prompt)
        spans = _spans_in(prompt, [text for text in texts if self._pattern.search(text)])
        ids: list[int] = []
        piece_start = 0
        strip_next = False
        for match in self._pattern.finditer(prompt):
            if any(start <= match.start() < end for start, end in spans):
                continue  # written by a user: stays in the plain piece
            token = self._specials[match.group()]
            ids += self._encode_plain(prompt[piece_start : match.start()], strip_next, token.lstrip)
            ids.append(self.tokenizer.token_to_id(match.group()))
            piece_start, strip_next = match.end(), token.rstrip
        ids += self._encode_plain(prompt[piece_start:], strip_next, False)
        return ids

    def _encode_plain(self, text: str, strip_left: bool, strip_right: bool) -> list[int]:
        # An added token with lstrip/rstrip swallows the whitespace beside it, as the tokenizer does.
        text = text.lstrip() if strip_left else text
        text = text.rstrip() if strip_right else text
        return self._plain.encode(text, add_special_tokens=False).ids if text else []


def _spans_in(prompt: str, texts: list[str]) -> list[tuple[int, int]]:
    """Where each text sits in the rendered prompt, searched in order."""
    spans, cursor = [], 0
    for text in texts:
        for candidate in (text, text.strip()):
            start = prompt.find(candidate, cursor)
            if start >= 0:
                spans.append((start, start + len(candidate)))
                cursor = start + len(candidate)
                break
        else:
            raise ChatContentError(
                "a message holds special-token text that this model's chat template rewrites, so it cannot be "
                "kept as plain text; remove the special-token text from the message"
            )
    return spans


@functools.lru_cache(maxsize=8)
def chat_encoder(tokenizer: Tokenizer) -> ChatEncoder:
    """One encoder per tokenizer (building one copies the tokenizer)."""
    return ChatEncoder(tokenizer)
