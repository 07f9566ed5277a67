"""The VLM quickstart's data set, made offline: lines of the run's own corpus drawn as pictures.

    corpus/train.jsonl ──► lines ──┬─► captions.jsonl       image -> the line         (alignment)
                                   └─► instructions.jsonl   "Transcribe the line." / "What does
                                                            this line define?" -> the answer (SFT)
    corpus/val.jsonl   ──► lines ──┬─► eval/transcribe.jsonl  generation, exact match on the line
                                   └─► eval/define.jsonl      multiple choice: which name, what kind

A line is one stripped source line of printable ASCII between `min_chars` and `max_chars` long. The
two splits' lines are kept apart both ways: no training picture shows a line of the validation split,
and no evaluation picture shows a line that also occurs in the training split (`return None` is in
both), so the evaluation asks about lines the model has never seen, as text or as a picture.

Every picture is drawn with PIL in one of the TrueType fonts that matplotlib ships (a core dependency:
the same font files on every machine, their sha256 recorded in the manifest with their licences) at
one of a few sizes, chosen by a seeded generator per picture; a line wider than the picture wraps onto
a second row, and a line that fits no size is left out. Lines are chosen by a hash of (seed, line),
so the same corpus and seed make the same pictures, byte for byte (PNG, no timestamps), whatever
the order of the corpus files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from trulyopen.errors import UserError
from trulyopen.files import atomic_open, sha256_file, write_bytes, write_json, write_text
from trulyopen.recipe import VLM_FONT_LICENCES, VlmImagesConfig

TRANSCRIBE = "Transcribe the line."
DEFINE = "What does this line define?"
LICENCE_FILES = {"Bitstream-Vera": "LICENSE_DEJAVU", "OFL-1.1": "LICENSE_STIX"}
_DEFINES = re.compile(r"^(?:async\s+)?(def|class)\s+([A-Za-z_]\w*)")
_KIND = {"def": "function", "class": "class"}


class CodeLinesError(UserError, ValueError):
    """The corpus or the settings cannot make the data set (the message names the field)."""


@dataclass(frozen=True)
class Line:
    text: str
    where: str  # document id and line number, e.g. stdlib/json/decoder.py:12


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def fonts_used(names: list[str]) -> list[dict]:
    """Each font file a recipe names: its file, sha256 and licence (what the data card lists)."""
    out = []
    for name in names:
        path = font_dir() / name
        if not path.is_file():  # (the recipe names only fonts matplotlib ships)
            raise CodeLinesError(f"vlm.images.fonts: {name!r} is not in this matplotlib ({font_dir()})")
        out.append({"file": name, "sha256": sha256_file(path), "license": VLM_FONT_LICENCES[name]})
    return out


def licence_text(spdx: str) -> str | None:
    """The full licence text matplotlib ships beside its fonts, for a font licence we name."""
    path = font_dir() / LICENCE_FILES.get(spdx, "-")
    return path.read_text(encoding="utf-8") if path.is_file() else None


def defines(line: str) -> tuple[str, str] | None:
    """("function" | "class", name) when the line starts a def or class, else None."""
    m = _DEFINES.match(line)
    return (_KIND[m.group(1)], m.group(2)) if m else None


def define_answer(kind: str, name: str) -> str:
    return f"a {kind} named {name}"


def corpus_lines(path: Path, cfg: VlmImagesConfig) -> dict[str, str]:
    """{line: where it first occurs} of the lines in a corpus file that may be drawn."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for record in map(json.loads, f):
            for i, raw in enumerate(record["text"].split("\n"), 1):
                line = raw.strip()
                if cfg.min_chars <= len(line) <= cfg.max_chars and line.isascii() and line.isprintable():
                    out.setdefault(line, f"{record['id']}:{i}")
    return out


def _pick(lines: dict[str, str], n: int, seed: int, salt: str) -> list[Line]:
    """n lines chosen by a hash of (seed, line): independent of the order they were read in."""

    def rank(text: str) -> bytes:
        return hashlib.sha256(f"{seed}/{salt}/{text}".encode()).digest()

    return [Line(t, lines[t]) for t in sorted(lines, key=rank)[:n]]


def split_lines(corpus: Path, cfg: VlmImagesConfig) -> tuple[list[Line], list[Line]]:
    """(training lines, held-out lines): each drawn from its split, and absent from the other one."""
    train = corpus_lines(corpus / "train.jsonl", cfg)
    val = corpus_lines(corpus / "val.jsonl", cfg)
    train_only = {t: w for t, w in train.items() if t not in val}
    val_only = {t: w for t, w in val.items() if t not in train}
    if not train_only or not val_only:
        raise CodeLinesError(
            f"{corpus}: no lines of {cfg.min_chars} to {cfg.max_chars} characters to draw "
            f"({len(train_only)} training, {len(val_only)} held-out); widen vlm.images.min_chars/max_chars "
            "or add data"
        )
    # the held-out define questions need def/class lines: up to half of them, then the others
    held = _pick(
        {t: w for t, w in val_only.items() if defines(t)}, (cfg.eval_lines + 1) // 2, cfg.seed, "eval"
    )
    rest = {t: w for t, w in val_only.items() if t not in {x.text for x in held}}
    held += _pick(rest, cfg.eval_lines - len(held), cfg.seed, "eval")
    return _pick(train_only, cfg.train_lines, cfg.seed, "train"), held


# ----------------------------------------------------------------------------- drawing


class Painter:
    """Draws a line of text on a fixed-size grey picture in a seeded choice of font and size."""

    def __init__(self, cfg: VlmImagesConfig):
        from PIL import ImageFont

        self.cfg = cfg
        self.fonts = {
            (name, size): ImageFont.truetype(str(font_dir() / name), size)
            for name in cfg.fonts
            for size in cfg.font_sizes
        }

    def rows(self, text: str, font) -> list[str] | None:
        """The text cut into rows that fit the width (at most as many as fit the height), or None."""
        width, height, margin = self.cfg.width, self.cfg.height, 2
        ascent, descent = font.getmetrics()
        if ascent + descent > height:
            return None
        rows, row = [], ""
        for ch in text:
            if font.getlength(row + ch) > width - 2 * margin:
                rows.append(row)
                row = ""
            row += ch
        rows.append(row)
        return rows if len(rows) * (ascent + descent) <= height else None

    def draw(self, text: str, rng: random.Random) -> tuple[bytes, str, int] | None:
        """PNG bytes of the picture, with its font and size; None when no size fits the line."""
        import io

        from PIL import Image, ImageDraw

        name = rng.choice(self.cfg.fonts)
        sizes = sorted(self.cfg.font_sizes, reverse=True)
        start = rng.randrange(len(sizes))
        for size in sizes[start:] + sizes[:start][::-1]:  # the drawn size, else the next smaller ones
            font = self.fonts[name, size]
            rows = self.rows(text, font)
            if rows is not None:
                break
        else:
            return None
        ink, paper = rng.randrange(0, 80), rng.randrange(200, 256)
        img = Image.new("L", (self.cfg.width, self.cfg.height), paper)
        draw = ImageDraw.Draw(img)
        ascent, descent = font.getmetrics()
        widest = max(font.getlength(r) for r in rows)
        x = rng.randrange(2, max(3, min(24, int(self.cfg.width - widest) - 1)))  # near the left edge
        y = (self.cfg.height - len(rows) * (ascent + descent)) // 2
        for i, row in enumerate(rows):
            draw.text((x, y + i * (ascent + descent)), row, font=font, fill=ink)
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # PIL writes no time or software chunks: same pixels, same bytes
        return buf.getvalue(), name, size


# ----------------------------------------------------------------------------- the data set


def _chat(image: str, question: str | None, answer: str) -> list[dict]:
    content: list[dict] = [{"type": "image", "image": image}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


class _Writer:
    """Draws pictures into out/images/<split>/ and keeps what each record needs."""

    def __init__(self, out: Path, painter: Painter, seed: int):
        self.out, self.painter, self.seed = out, painter, seed
        self.images: list[Path] = []
        self.skipped = 0

    def picture(self, split: str, line: Line) -> tuple[str, str, dict] | None:
        """(path relative to out, the line's key, meta) of a new picture of the line; None if it fits
        no size."""
        rng = random.Random(f"{self.seed}/{split}/{line.text}")
        drawn = self.painter.draw(line.text, rng)
        if drawn is None:
            self.skipped += 1
            return None
        png, font, size = drawn
        key = hashlib.sha256(line.text.encode()).hexdigest()[:16]
        rel = f"images/{split}/{key}.png"
        write_bytes(self.out / rel, png)
        self.images.append(self.out / rel)
        return rel, key, {"line": line.where, "font": font, "size": size}


def _jsonl(path: Path, records: list[dict]) -> Path:
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def make_dataset(corpus: Path, out: Path, cfg: VlmImagesConfig, sources: list[dict] = ()) -> list[Path]:
    """Write the data set under `out` (see the module's docstring) with its data card, naming the
    corpus `sources` ({name, type, license}); return every file written."""
    fonts = fonts_used(cfg.fonts)
    train, held = split_lines(corpus, cfg)
    for made in ("images", "eval"):  # an earlier run's pictures and tasks must not linger
        shutil.rmtree(out / made, ignore_errors=True)
    writer = _Writer(out, Painter(cfg), cfg.seed)
    captions, instructions = [], []
    for line in train:
        # a picture for the caption and another (another font and size) for the instruction
        for split, records in (("caption", captions), ("instruct", instructions)):
            drawn = writer.picture(split, line)
            if drawn is None:
                continue
            rel, key, meta = drawn
            q, a = (None, line.text) if split == "caption" else (TRANSCRIBE, line.text)
            what = defines(line.text)
            if split == "instruct" and what and random.Random(f"{cfg.seed}/q/{line.text}").random() < 0.5:
                q, a = DEFINE, define_answer(*what)
            records.append({"id": f"{split}/{key}", "messages": _chat(rel, q, a), "meta": meta})

    transcribe, define = [], []
    names = sorted({d[1] for d in map(defines, (x.text for x in held)) if d})
    for line in held:
        drawn = writer.picture("eval", line)
        if drawn is None:
            continue
        rel, key, meta = drawn
        image = f"../{rel}"  # task files live in eval/, relative paths are resolved against them
        transcribe.append({
            "id": f"transcribe/{key}", "prompt": TRANSCRIBE, "images": [image],
            "verifier": {"type": "exact", "answer": line.text}, "meta": meta,
        })  # fmt: skip
        what = defines(line.text)
        if what and len(names) >= 2:
            define.append(_define_item(line, key, what, names, image, meta, cfg.seed))
    if not captions or not transcribe:
        raise CodeLinesError(
            f"vlm.images: no line fits a {cfg.width}x{cfg.height} picture at sizes {cfg.font_sizes}; "
            "make the picture larger, the fonts smaller or vlm.images.max_chars shorter"
        )
    files = [
        _jsonl(out / "captions.jsonl", captions),
        _jsonl(out / "instructions.jsonl", instructions),
        _jsonl(out / "eval" / "transcribe.jsonl", transcribe),
    ]
    suite = [
        {"name": "transcribe_line", "path": "transcribe.jsonl", "type": "generation", "max_new_tokens": 32}
    ]
    if define:
        files.append(_jsonl(out / "eval" / "define.jsonl", define))
        suite.append({"name": "define_line", "path": "define.jsonl", "type": "multiple_choice"})
    write_text(out / "eval" / "suite.yaml", yaml.safe_dump(suite, sort_keys=False))
    manifest = {
        "seed": cfg.seed,
        "size": [cfg.width, cfg.height],
        "font_sizes": cfg.font_sizes,
        "fonts": fonts,
        "lines": {"train": len(train), "heldout": len(held), "skipped_too_wide": writer.skipped},
        "records": {
            "captions": len(captions),
            "instructions": len(instructions),
            "transcribe": len(transcribe),
            "define": len(define),
        },
        "corpus": {name: sha256_file(corpus / name) for name in ("train.jsonl", "val.jsonl")},
    }
    write_json(out / "manifest.json", manifest)
    write_text(out / "DATACARD.md", data_card(manifest, list(sources)))
    return sorted(
        [*files, out / "eval" / "suite.yaml", out / "manifest.json", out / "DATACARD.md", *writer.images]
    )


def _define_item(
    line: Line, key: str, what: tuple[str, str], names: list[str], image: str, meta: dict, seed: int
) -> dict:
    """A multiple-choice item: the right kind and name against the other kind, and other names."""
    kind, name = what
    rng = random.Random(f"{seed}/define/{line.text}")
    other = rng.sample([n for n in names if n != name], min(2, len(names) - 1))
    wrong = [define_answer("class" if kind == "function" else "function", name)]
    wrong += [define_answer(kind, n) for n in other]
    choices = [define_answer(kind, name), *wrong]
    rng.shuffle(choices)
    return {
        "id": f"define/{key}",
        "context": DEFINE,
        "choices": choices,
        "answer": choices.index(define_answer(kind, name)),
        "images": [image],
        "meta": meta,
    }


def data_card(manifest: dict, sources: list[dict]) -> str:
    """DATACARD.md of the pictures: where their text and their fonts come from, under which licences,
    what was made of them and what was held out."""
    text_rows = "\n".join(f"| `{s['name']}` ({s['type']}) | {s['license']} |" for s in sources)
    font_rows = "\n".join(
        f"| `{f['file']}` | matplotlib's `mpl-data/fonts/ttf` | {f['license']} | `{f['sha256']}` |"
        for f in manifest["fonts"]
    )
    r, n = manifest["records"], manifest["lines"]
    w, h = manifest["size"]
    return f"""# Data card: rendered code lines

Pictures of single lines of this run's curated corpus, drawn offline with PIL: {w}x{h} pixels,
grey text on a grey background, in the fonts below at sizes {", ".join(map(str, manifest["font_sizes"]))}
pixels (seed {manifest["seed"]}; the same corpus and seed give the same PNG files, byte for byte).

## Sources and licences

The text of every picture is a line of the curated corpus (`corpus/train.jsonl` for training,
`corpus/val.jsonl` for evaluation), each record's `meta.line` naming the document and line:

| corpus source | licence |
|---|---|
{text_rows}

The glyphs come from these font files (the licence texts are in `LICENSES/fonts/`):

| font file | from | licence | sha256 |
|---|---|---|---|
{font_rows}

DejaVu fonts are Bitstream Vera's glyphs, with DejaVu's changes in the public domain; STIX fonts are
under the SIL Open Font Licence 1.1. Neither licence restricts pictures drawn with the fonts.

## What was made

- `captions.jsonl`: {r["captions"]:,} records, a picture and the line it shows (alignment, LLaVA stage 1).
- `instructions.jsonl`: {r["instructions"]:,} records on other pictures of the same lines: "{TRANSCRIBE}"
  or, for a def or class line, "{DEFINE}" (instruction tuning, LLaVA stage 2).
- `eval/transcribe.jsonl`: {r["transcribe"]:,} held-out pictures to transcribe (exact match);
  `eval/define.jsonl`: {r["define"]:,} multiple-choice questions on what a held-out line defines.

Lines are {n["train"]:,} of the training split and {n["heldout"]:,} of the validation split
({n["skipped_too_wide"]:,} left out: too wide for the picture at every size). No line of the
validation split is in a training picture, and no held-out picture shows a line that also occurs in
the training split.
"""
