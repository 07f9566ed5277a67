"""From a growing list of token ids to text that can be streamed piece by piece.

Two things must not reach a client early: half a character (a byte-level token can end inside a
multi-byte UTF-8 sequence, which decodes to U+FFFD until the next token completes it), and the
beginning of a stop string (which is cut from the text if it completes). Both are held back until
the next token settles them.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = ()):
        self.decode, self.stop_strings = decode, stop_strings
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string completed."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        end = len(self.text.rstrip(REPLACEMENT))
        end -= self._stop_prefix(self.text[:end])
        return self._take(end), False

    def flush(self) -> str:
        """At the end: what was held back (an unfinished character stays as U+FFFD)."""
        return self._take(len(self.text))

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
