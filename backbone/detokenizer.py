"""Token-by-token text for streaming, UTF-8 safe.

A byte-level token can hold part of a multi-byte character (an emoji is often 2-4 tokens), and
some decoders change how a token reads depending on the tokens before it (sentencepiece drops
the leading space of the first token). So a token cannot be decoded on its own. As in vLLM, we
decode a short window of recent tokens twice -- up to the last emitted token (`prefix`) and up to
the newest -- and emit the difference, holding it back while it ends in U+FFFD, the mark of an
incomplete character.
"""

from __future__ import annotations

from backbone.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids one at a time; the concatenated results equal `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start: context decoded but already emitted
        self.read_offset = 0  # tokens before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "" while a character is partial)."""
        self.token_ids.append(int(token_id))
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing visible yet, or a multi-byte character still incomplete
        # The tokens just emitted become the next window's context, so the window stays short.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is held back at the end of generation (e.g. a truncated character as U+FFFD)."""
        prefix_text, new_text = self._window_texts()
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _window_texts(self) -> tuple[str, str]:
        window = self.token_ids[self.prefix_offset :]
        emitted = self.read_offset - self.prefix_offset
        decode = self.tokenizer.decode
        return (
            decode(window[:emitted], skip_special_tokens=self.skip_special_tokens),
            decode(window, skip_special_tokens=self.skip_special_tokens),
        )
