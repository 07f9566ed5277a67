"""The notebooks in notebooks/, executed top to bottom with nbclient at toy size, offline, each in a
temporary working directory with its parameters injected (papermill's convention: a cell after the
one tagged `parameters`). Each notebook ends in a cell that asserts what it teaches (the loss went
down, verify found no problem, a tampered file was caught, the server answered), so a notebook that
stops teaching it fails here.

Time: a notebook pays for its own kernel and its imports (torch, transformers: most of its seconds).
The quickstart tour runs the toy quickstart from scratch; the notebooks that start from the same toy
run (04, 05, 06: the same TOY_SIZE overrides) get a copy of the tour's run directory as RUN_DIR, so
their stages are up to date and skipped, as they are for a user who ran the tour first.

And the public API that the notebooks use: `import trulyopen` stays light, and its names resolve.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = ROOT / "notebooks"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
EXPECTED = [
    "01_quickstart_tour.ipynb",
    "02_curate_your_corpus.ipynb",
    "03_lora_finetune_hf_model.ipynb",
    "04_evaluate_and_compare.ipynb",
    "05_release_and_audit.ipynb",
    "06_serve_and_call.ipynb",
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A Jupyter kernel spec that runs this interpreter (the virtual environment's python, wherever
    the suite runs), found through JUPYTER_PATH: a user's own `python3` kernel may be another Python."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "trulyopen-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    env = {"TRULYOPEN_QUIET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "trulyopen tests", "language": "python", "env": env})
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield "trulyopen-tests"


def execute(kernel: str, name: str, workdir: Path, **params):
    """Run notebook `name` in `workdir` with `params` injected; the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    workdir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=300,
        resources={"metadata": {"path": str(workdir)}},
        shutdown_kernel="immediate",  # the work is done and on disk: a graceful exit costs 1-2 s more
    )
    client.execute()
    return nb


def last_words(nb) -> str:
    """What the notebook's last code cell printed."""
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_committed_notebooks_are_stripped_and_parametrized():
    import nbformat

    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: outputs in git"
        assert nb.cells[0].cell_type == "markdown" and "How long" in nb.cells[0].source, name
        assert code[0].metadata.get("tags") == ["parameters"] and "TOY = True" in code[0].source, name
        assert "import trulyopen as to" in "".join(c.source for c in code), name
        assert not any(line.lstrip().startswith("!") for c in code for line in c.source.splitlines()), name


@pytest.fixture(scope="module")
def tour(kernel, tmp_path_factory):
    """01 from scratch: the toy quickstart's whole lifecycle; its run directory and what it said."""
    work = tmp_path_factory.mktemp("tour")
    nb = execute(
        kernel, "01_quickstart_tour.ipynb", work, QUICKSTART=str(QUICKSTART), RUN_DIR=str(work / "run")
    )
    return work / "run", last_words(nb)


def seeded(tour, tmp_path: Path) -> dict:
    """Parameters for a notebook that starts from the toy quickstart: a copy of the tour's run."""
    run_dir = tmp_path / "run"
    shutil.copytree(tour[0], run_dir, symlinks=True)
    return {"QUICKSTART": str(QUICKSTART), "RUN_DIR": str(run_dir)}


def test_quickstart_tour(tour):
    run_dir, said = tour
    assert "released as Class I - Open Science" in said and "files verified" in said, said
    assert (run_dir / "release" / "SHA256SUMS").is_file()


def test_curate_your_corpus(kernel, tmp_path):
    nb = execute(kernel, "02_curate_your_corpus.ipynb", tmp_path)
    said = last_words(nb)
    assert "'exact_dedup': 1" in said and "'near_dedup': 1" in said and "'decontamination': 1" in said, said
    assert (tmp_path / "runs/curate/data/DATACARD.md").is_file()


def test_lora_finetune_hf_model(kernel, tmp_path):
    nb = execute(kernel, "03_lora_finetune_hf_model.ipynb", tmp_path)
    assert "adapter" in last_words(nb)
    assert (tmp_path / "tiny-llama" / "config.json").is_file()  # the stand-in base, as a HF directory
    assert (tmp_path / "lora-export" / "adapter" / "adapter_model.safetensors").is_file()


def test_evaluate_and_compare(kernel, tour, tmp_path):
    nb = execute(kernel, "04_evaluate_and_compare.ipynb", tmp_path, **seeded(tour, tmp_path))
    assert "bits per byte by step" in last_words(nb)
    results = sorted(p.parent.name for p in (tmp_path / "runs/compare-eval").glob("*/results.json"))
    assert results == ["step_000002", "step_000004", "step_000006"]


def test_release_and_audit(kernel, tour, tmp_path):
    nb = execute(kernel, "05_release_and_audit.ipynb", tmp_path, **seeded(tour, tmp_path))
    assert "replayed bit for bit\ntampering caught" in last_words(nb)
    assert json.loads((tmp_path / "audit.json").read_text())["class"] == 1


def test_serve_and_call(kernel, tour, tmp_path):
    nb = execute(kernel, "06_serve_and_call.ipynb", tmp_path, **seeded(tour, tmp_path))
    assert "the server answered" in last_words(nb) and "and the stream matched" in last_words(nb)


# ----------------------------------------------------------------------------- the API itself


def test_import_is_light_and_every_name_resolves():
    code = (
        "import sys, trulyopen; assert 'torch' not in sys.modules and 'trulyopen.api' not in sys.modules; "
        "print(all(callable(getattr(trulyopen, n)) for n in trulyopen.__all__[1:]), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]  # every name is there, and still nothing heavy
    import trulyopen

    packages = {p.stem for p in Path(trulyopen.__file__).parent.iterdir() if not p.name.startswith("_")}
    assert not packages & set(trulyopen._API)  # trulyopen.X is one thing whichever modules were imported


def test_recipe_as_a_dict_is_checked_like_a_file(tmp_path, monkeypatch):
    import trulyopen as to
    from trulyopen.recipe import RecipeError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    tree = {
        "name": "mine",
        "data": {"sources": [{"name": "a", "type": "directory", "path": "mine", "license": "MIT"}]},
    }
    recipe = to.load_recipe(tree, ["pretrain.max_steps=3"])
    assert recipe.pretrain.max_steps == 3 and recipe.data.sources[0].path == tmp_path / "mine"
    assert "name" in tree and "pretrain" not in tree  # the caller's dict is left as it was
    with pytest.raises(RecipeError, match=r"recipe 'mine': field 'pretrain.max_steps'"):
        to.load_recipe(recipe, ["pretrain.max_steps=0"])
