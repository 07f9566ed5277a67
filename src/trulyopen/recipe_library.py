"""The recipe library: tested recipes shipped inside the package, to list and to start from.

    recipes/*.yaml  (the repository's)  ══  trulyopen/recipes/*.yaml  (a symlink: the wheel's package data)
          │
          ├─► `trulyopen recipes [NAME]`          each recipe: what it does, hardware and time (its header)
          └─► `trulyopen init NAME --from RECIPE`  RECIPE copied to NAME.yaml, its `name:` set to NAME

Every recipe starts with a header comment, its documentation and the listing's source:

    # <what it does, one line>
    # Hardware: <what it expects>; <about how long it takes>
    # Run: <the command>
    #   <a field goes on over lines indented by two more spaces>

`tests/test_recipes.py` checks that every recipe has one, validates it, and runs it at toy size.
A copy keeps the recipe's comments and bytes, only its top-level `name:` changes (so that its run
directory, runs/<name>/, is its own); relative paths in it now resolve against the copy's folder,
and `init` names those that are not there yet.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from itertools import takewhile
from pathlib import Path

import yaml

from trulyopen.errors import UserError
from trulyopen.files import write_text

SPACE_SUFFIX = ".tune"  # quickstart.tune.yaml: a search space for `trulyopen tune`, not a recipe
# a header field: "Hardware: ...", or with a qualifier, "Run, on the login node: ..." (kept in the value)
_FIELD = re.compile(r"^([A-Z][a-z]+)(?:, ([^:]{1,60}))?:\s*(.*)$")
_NAME_LINE = re.compile(r"^name:[ \t]*([^#\n]*?)([ \t]+#[^\n]*)?$", re.MULTILINE)


class LibraryError(UserError):
    """A recipe name that is not in the library, or a copy that would overwrite a file."""


@dataclass(frozen=True)
class Header:
    """A recipe's header comment: its first line, and its `Key: value` fields (continuations joined)."""

    summary: str
    fields: dict[str, str] = field(default_factory=dict)  # continuation lines joined by newlines
    text: str = ""  # the whole comment, '#' marks removed


@dataclass(frozen=True)
class Entry:
    name: str  # the file name without .yaml: what `--from` takes
    path: Path
    header: Header

    @property
    def is_space(self) -> bool:
        return self.name.endswith(SPACE_SUFFIX)


def library_dir() -> Path:
    """Where the recipes are: the package's recipes/ folder (in a checkout, the repository's)."""
    return Path(str(resources.files("trulyopen") / "recipes"))


def parse_header(text: str) -> Header:
    """The leading comment block of a YAML file. Its first paragraph holds the fields: a field starts
    with `# Key: value`, and a line indented by two more spaces (`#   ...`) continues it on a new line."""
    lines = list(takewhile(lambda line: line.startswith("#"), text.splitlines()))
    body = [line[1:].removeprefix(" ").rstrip() for line in lines]
    fields: dict[str, str] = {}
    key = None
    for raw, line in zip(lines[1:], body[1:], strict=True):
        if not line.strip():
            break  # the first paragraph ends: what follows is prose
        if key is not None and raw.startswith("#   "):
            fields[key] += "\n" + line.strip()
            continue
        match = _FIELD.match(line)
        key = match.group(1) if match else None
        if match:
            qualifier, value = match.group(2), match.group(3).strip()
            fields[match.group(1)] = f"{qualifier}: {value}" if qualifier else value
    return Header(body[0].strip() if body else "", fields, "\n".join(body))


def entries(folder: Path | None = None) -> list[Entry]:
    """Every recipe of the library, recipes first, then search spaces, each by name."""
    folder = folder or library_dir()
    found = [
        Entry(p.name.removesuffix(".yaml"), p, parse_header(p.read_text(encoding="utf-8")))
        for p in sorted(folder.glob("*.yaml"))
    ]
    return sorted(found, key=lambda e: (e.is_space, e.name))


def find(source: str, folder: Path | None = None) -> Path:
    """A recipe by its library name (`lora`), or by the path of any recipe file."""
    library = {e.name: e.path for e in entries(folder)}
    if source in library:
        return library[source]
    path = Path(source)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return path
    if path.exists():
        raise LibraryError(f"--from {source}: not a recipe file (.yaml); give a recipe name or a recipe file")
    raise LibraryError(
        f"--from {source}: no recipe of that name in the library and no such file "
        f"(recipes: {', '.join(library)}); see `trulyopen recipes`"
    )


def target_path(name: str) -> Path:
    """NAME -> NAME.yaml; a name that already ends in .yaml or .yml is the file itself."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else path.with_name(path.name + ".yaml")


def run_name(target: Path) -> str:
    return target.name.removesuffix(".yaml").removesuffix(".yml")


def copy(source: str, name: str, folder: Path | None = None) -> tuple[Path, Path]:
    """Copy a recipe (by library name or path) to NAME.yaml with its `name:` set to NAME; never over
    an existing file. Returns (the copy, the recipe it came from)."""
    origin = find(source, folder)
    target = target_path(name)
    if target.exists():
        raise LibraryError(f"{target}: already exists; choose another NAME, or move that file away first")
    try:
        text = origin.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())[:200]
        raise LibraryError(f"--from {source}: not readable as YAML ({detail}); give a recipe file") from None
    if not isinstance(tree, dict):
        raise LibraryError(f"--from {source}: not a recipe (no mapping of fields at the top level)")
    if not origin.name.endswith(f"{SPACE_SUFFIX}.yaml"):
        text = _NAME_LINE.sub(lambda m: f"name: {run_name(target)}{m.group(2) or ''}", text, count=1)
    write_text(target, text)  # (under a temporary name, renamed into place whole)
    return target, origin


def missing_paths(recipe_file: Path) -> list[tuple[str, Path]]:
    """(dotted field, path) of the files and folders a recipe names that are not there (yet): what a
    copy's user still has to provide. Nothing for a file that is not a valid recipe."""
    from pydantic import ValidationError

    from trulyopen.recipe import Recipe

    try:
        recipe = Recipe.model_validate(yaml.safe_load(recipe_file.read_text(encoding="utf-8")))
    except (ValidationError, yaml.YAMLError, ValueError):
        return []
    recipe.resolve_paths(recipe_file.resolve().parent)
    return recipe.missing_paths()


def listing(width: int = 100, folder: Path | None = None) -> str:
    """The library as `trulyopen recipes` prints it: per recipe its name and first header line, and
    below them its Hardware line (hardware and time), wrapped to `width` columns."""
    found = entries(folder)
    pad = max((len(e.name) for e in found), default=0) + 4
    indent = " " * pad

    def fill(text: str, first: str = indent) -> str:  # names such as SmolLM2-1.7B-Instruct stay whole
        return textwrap.fill(
            text, width, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False
        )

    out: list[str] = []
    groups = (
        (f"Recipes ({folder or library_dir()}):", [e for e in found if not e.is_space]),
        ("Search spaces, for `trulyopen tune RECIPE --space FILE`:", [e for e in found if e.is_space]),
    )
    for title, group in groups:
        if group:
            out += ["", title] if out else [title]
        for e in group:
            out.append(fill(e.header.summary, f"  {e.name}".ljust(pad)))
            if "Hardware" in e.header.fields:
                out.append(fill(e.header.fields["Hardware"]))
    out += [
        "",
        "Start from one: trulyopen init NAME --from RECIPE   (how to run it: trulyopen recipes RECIPE)",
    ]
    return "\n".join(out)
