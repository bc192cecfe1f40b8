"""One request's output text as it streams: detokenised token by token, cut at stop strings.

A stop string can arrive split over several tokens, so text that could still be the start of
one is held back until the next token shows whether it is; the stop string itself is never sent.
"""

from __future__ import annotations

from backbone.detokenizer import IncrementalDetokenizer
from backbone.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = list(stop)
        self.text = ""  # everything decoded so far (cut at the stop string once one matched)
        self._sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string matched: the completion is over

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text now safe to send (may be "")."""
        self.text += self._detokenizer.push(token_id)
        return self._release()

    def finish(self) -> str:
        """The end of generation: whatever was held back (a partial character, a partial stop
        string that never completed)."""
        if not self.stopped:
            self.text += self._detokenizer.flush()
            cut = self._first_stop()
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _release(self) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = len(self.text) - self._held_back()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _first_stop(self) -> int | None:
        # A match can only end in text not yet sent, so search from just before it.
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        found = [index for s in self._stop if (index := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        unsent = len(self.text) - self._sent
        for length in range(min(unsent, max((len(s) - 1 for s in self._stop), default=0)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
