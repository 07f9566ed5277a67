"""A trace result for the terminal: the text with its traced spans marked, then each span's documents."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text


def show(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    spans = result["spans"]
    text = Text(result["text"])
    for s in spans:
        text.stylize("bold underline cyan", s["start"], s["end"])
    console.print(text)
    index = result["index"]
    console.print(
        f"\n{len(spans)} span(s) of at least {result['options']['min_len']} tokens found in the training "
        f"data ({index['tokens']:,} tokens, {index['docs']:,} documents)"
    )
    for n, s in enumerate(spans, 1):
        head = s["text"] if len(s["text"]) <= 80 else s["text"][:77] + "..."
        console.print(
            Text(f"\n[{n}] {s['length']} tokens, {s['count']:,} occurrence(s): {head!r}", style="bold")
        )
        for d in s["docs"]:
            console.print(f"    {d['id']}  ({d['source']}, licence {d['license']})")
            a, b, ctx = d["match_start"], d["match_end"], d["context"]
            excerpt = Text("      ")
            for part, style in ((ctx[:a], "dim"), (ctx[a:b], "cyan"), (ctx[b:], "dim")):
                excerpt.append(part.replace("\n", "\n      "), style=style)
            console.print(excerpt)
