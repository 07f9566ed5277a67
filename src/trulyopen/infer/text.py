"""From a growing list of token ids to text that can be streamed piece by piece.

Two things must not reach a client early: half a character (a byte-level token can end inside a
multi-byte UTF-8 sequence, which decodes to U+FFFD until the next token completes it), and the
beginning of a stop string (which is cut from the text if it completes). Both are held back until
the next token settles them.

Decoding is incremental, as vLLM does it: only a short window of recent tokens is decoded per
token, not the whole answer again, so the cost per token stays flat however long the answer.

    ids:   ... settled ... | prefix .. read | new tokens
                             └ decoded twice: with and without the new tokens; the new text is
                               the difference (a window, so a tokenizer that drops a leading
                               space at the start of what it decodes drops it on both sides)
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = ()):
        self.decode, self.stop_strings = decode, stop_strings
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window ids[prefix:read] is already part of `text`
        self.text = ""  # the settled text so far (stop string cut off)
        self.sent = 0  # characters of `text` already returned

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string completed."""
        self.ids.append(token)
        before = len(self.text)
        self._settle(final=False)
        tail = max(0, before - max(map(len, self.stop_strings), default=0))
        cut = min((i for i in (self.text.find(s, tail) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._stop_prefix(self.text)), False

    def flush(self) -> str:
        """At the end: what was held back (an unfinished character stays as U+FFFD)."""
        self._settle(final=True)
        return self._take(len(self.text))

    def _settle(self, final: bool) -> None:
        """Append the text of the tokens after the window, unless it ends in half a character."""
        known = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if len(now) > len(known) and (final or not now.endswith(REPLACEMENT)):
            self.text += now[len(known) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
