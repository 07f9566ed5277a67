from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trulyopen.cli import app
from trulyopen.recipe import RecipeError, load_recipe

runner = CliRunner()


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


BASE = {"name": "t", "data": {"sources": [{"name": "s", "type": "python-stdlib", "license": "PSF-2.0"}]}}


def test_quickstart_recipe_is_valid():
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "quickstart.yaml")
    assert r.name == "quickstart" and r.data.sources[0].type == "python-stdlib"


def test_unknown_key_names_file_and_field(tmp_path):
    p = _write(tmp_path, {**BASE, "data": {**BASE["data"], "dedup": {"treshold": 0.5}}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "data.dedup.treshold" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_says_what_was_expected(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["data.dedup.threshold=high"])
    assert "data.dedup.threshold" in str(e.value) and "number" in str(e.value) and "'high'" in str(e.value)


def test_missing_path_is_reported_before_work(tmp_path):
    tree = {
        "name": "t",
        "data": {"sources": [{"name": "s", "type": "directory", "path": "nope", "license": "MIT"}]},
    }
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, tree))
    assert "data.sources.0.path" in str(e.value) and "does not exist" in str(e.value)


def test_overrides_keep_types_and_reach_list_items(tmp_path):
    (tmp_path / "d").mkdir()
    tree = {
        "name": "t",
        "data": {"sources": [{"name": "s", "type": "directory", "path": "x", "license": "MIT"}]},
    }
    r = load_recipe(
        _write(tmp_path, tree), ["data.sources.0.path=d", "data.dedup.threshold=0.7", "data.dedup.near=false"]
    )
    assert r.data.sources[0].path == (tmp_path / "d").resolve()
    assert r.data.dedup.threshold == 0.7 and r.data.dedup.near is False


def test_bands_must_divide_permutations(tmp_path):
    with pytest.raises(RecipeError, match="multiple of bands"):
        load_recipe(_write(tmp_path, BASE), ["data.dedup.num_perm=100", "data.dedup.bands=14"])


def test_cli_exit_code_2_on_bad_recipe(tmp_path):
    p = _write(tmp_path, {**BASE, "bogus": 1})
    result = runner.invoke(app, ["run", str(p)])
    assert result.exit_code == 2
    assert "bogus" in result.output and str(p) in result.output


def test_every_verb_has_help():
    for verb in ("run", "data", "tokenizer", "inspect"):
        result = runner.invoke(app, [verb, "--help"])
        assert result.exit_code == 0, verb
        assert "Usage" in result.output


def test_models_named_by_a_directory_beside_the_recipe_resolve_against_it(tmp_path, monkeypatch):
    """finetune.base, distill.teacher and grpo.reward_model: a directory beside the recipe, whatever
    the current directory; a name that is no directory there stays a hub name."""
    for d in ("base", "teacher", "judge"):
        (tmp_path / "models" / d).mkdir(parents=True)
    tree = {
        "name": "t",
        "finetune": {
            "base": "models/base",
            "method": "distill",
            "data": [{"path": "r.yaml"}],
            "distill": {"teacher": "models/teacher"},
            "grpo": {"reward_model": "models/judge"},
        },
    }
    monkeypatch.chdir(tmp_path.parent)
    ft = load_recipe(_write(tmp_path, tree)).finetune
    assert (ft.base, ft.distill.teacher, ft.grpo.reward_model) == tuple(
        str((tmp_path / "models" / d).resolve()) for d in ("base", "teacher", "judge")
    )
    ft = load_recipe(_write(tmp_path, tree), ["finetune.distill.teacher=org/teacher-1b"]).finetune
    assert ft.distill.teacher == "org/teacher-1b"
