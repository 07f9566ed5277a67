"""A release's code/requirements.txt: one command that reinstalls the packages the release was made with.

    cd RELEASE && pip install -r code/requirements.txt

It pins trulyopen's runtime dependencies, walked recursively through each installed package's own
requirements (markers evaluated on this machine, extras followed), at the versions installed now,
and installs trulyopen itself from the source bundled beside the file. Development tools and
packages the run did not need are left out: they do not change what the release's code computes,
and pinning them would only make the file harder to install elsewhere.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from trulyopen.files import write_text

# the bundled pyproject.toml comes from a src/ layout; in the release the package sits beside it
_SRC_LAYOUT = 'where = ["src"]'
_FLAT_LAYOUT = 'where = ["."]'


def dependency_closure(root: str = "trulyopen") -> dict[str, str]:
    """{name: installed version} of every installed package that `root` needs to run, root excluded."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while pending:
        name, extras = pending.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # required only on other platforms, or optional and not installed here
        if canonicalize_name(name) != canonicalize_name(root):
            pins[dist.metadata["Name"]] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            # `extra == "x"` markers hold only when x was asked for; "" stands for no extra at all
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                pending.append((req.name, frozenset(req.extras)))
    return pins


def requirements_txt(pins: dict[str, str], source: str = "./code") -> str:
    """The file's text: the pins, sorted by name, then the bundled source at `source`."""
    lines = [
        "# The packages this release was made with: trulyopen's runtime dependencies, pinned to the",
        "# versions installed, and trulyopen itself from the source in this directory. From the",
        "# release directory:",
        "#     pip install -r code/requirements.txt",
    ]
    if any("+" in version for version in pins.values()):
        lines += [
            "# A version with a +label is a local build (torch's +cpu): it installs from its project's",
            "# own index, e.g. pip install --extra-index-url https://download.pytorch.org/whl/cpu ...",
        ]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins, key=str.lower)]
    lines.append(source)
    return "\n".join(lines) + "\n"


def write_requirements(code_dir: Path) -> None:
    """code/requirements.txt for this environment; and code/pyproject.toml made installable as bundled."""
    pyproject = code_dir / "pyproject.toml"
    source = "./code"
    if pyproject.is_file() and _SRC_LAYOUT in pyproject.read_text(encoding="utf-8"):
        text = pyproject.read_text(encoding="utf-8").replace(_SRC_LAYOUT, _FLAT_LAYOUT, 1)
        write_text(pyproject, text)
    elif not pyproject.is_file():
        source = "# (no pyproject.toml was bundled: put code/ on PYTHONPATH to use trulyopen)"
    write_text(code_dir / "requirements.txt", requirements_txt(dependency_closure(), source))
