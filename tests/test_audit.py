"""The Model Openness Framework audit: the tool's own scoring rules on release files, and a plain
Hugging Face folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from trulyopen.release import mof
from trulyopen.release.audit import AuditError, audit

REQUIRED = [c.name for c in mof.COMPONENTS if c.required]
LICENCES = {
    "distribution": {"name": "Apache-2.0"},
    "code": {"name": "Apache-2.0"},
    "data": {"name": "CDLA-Permissive-2.0"},
    "document": {"name": "CC-BY-4.0"},
}


def release_dir(tmp_path, names, overrides=None, licences=LICENCES):
    """A directory holding one file per named component and a mof.yml that claims them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    components = []
    for i, name in enumerate(names):
        path = f"part{i}.txt"
        (tmp_path / path).write_text(name)
        entry = {"name": name, "description": mof.BY_NAME[name].description, "component_path": path}
        entry.update((overrides or {}).get(name, {}))
        components.append(entry)
    doc = {
        "framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
        "release": {"name": "tiny", "version": "1", "license": licences, "components": components},
    }
    (tmp_path / "mof.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path


def test_a_complete_open_release_is_class_one_and_a_missing_dataset_drops_it_to_two(tmp_path):
    root = release_dir(tmp_path, [c.name for c in mof.COMPONENTS])
    result = audit(root)
    assert result.cls == 1 and result.progress == {3: 100.0, 2: 100.0, 1: 100.0}
    assert all(v.status in ("included", "optional") for v in result.verdicts.values())
    assert all(r["met"] for r in result.to_json()["osaid"].values())
    # the data leaves the release: Class II, with the missing component named
    datasets = next(e for e in yaml.safe_load((root / "mof.yml").read_text())["release"]["components"]
                    if e["name"] == "Datasets")  # fmt: skip
    (root / datasets["component_path"]).unlink()
    result = audit(root)
    assert result.cls == 2 and result.verdicts["Datasets"].status == "missing"
    assert result.progress[1] == pytest.approx(100 * 13 / 14)
    assert any(p.startswith("Datasets: claimed at") for p in result.problems)


def test_research_paper_stands_in_for_the_technical_report(tmp_path):
    """The tool's golden 'Class2R' case: no report, a paper, Class II complete: 10/13 of Class I."""
    names = [n for n in REQUIRED if mof.BY_NAME[n].cls >= 2 and n != "Technical report"] + ["Research paper"]
    result = audit(release_dir(tmp_path, names))
    assert result.progress == pytest.approx({3: 100.0, 2: 100.0, 1: 100 * 10 / 13})
    assert result.cls == 2


def test_unlicensed_or_closed_components_fail_their_class_and_wrong_types_warn(tmp_path):
    names = [c.name for c in mof.COMPONENTS]
    unlicensed = audit(release_dir(tmp_path / "a", names, {"Training code": {"license": "unlicensed"}}))
    assert unlicensed.verdicts["Training code"].status == "unlicensed"
    assert unlicensed.cls == 3 and unlicensed.progress[2] == pytest.approx(90.0)
    closed = audit(
        release_dir(tmp_path / "b", names, {"Model parameters (Final)": {"license": "CC-BY-NC-4.0"}})
    )
    assert closed.verdicts["Model parameters (Final)"].status == "invalid" and closed.cls == 0
    assert closed.progress == {3: pytest.approx(100 * 5 / 6), 2: 0.0, 1: 0.0}
    warned = audit(release_dir(tmp_path / "c", names, {"Datasets": {"license": "Apache-2.0"}}))
    assert warned.cls == 1 and "not a licence meant for data" in warned.verdicts["Datasets"].warning
    # with no licence anywhere, nothing counts
    bare = audit(release_dir(tmp_path / "d", names, licences={}))
    assert bare.cls == 0 and {v.status for v in bare.verdicts.values()} == {"unlicensed"}


def test_bad_mof_yml_names_file_and_field(tmp_path):
    release_dir(tmp_path, ["Model card"])
    doc = yaml.safe_load((tmp_path / "mof.yml").read_text())
    doc["release"]["components"].append({"name": "Model weights"})
    (tmp_path / "mof.yml").write_text(yaml.safe_dump(doc))
    with pytest.raises(AuditError, match=r"mof.yml: release.components\[1\].name 'Model weights'"):
        audit(tmp_path)


def test_plain_hugging_face_folder_reports_what_it_lacks(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\nA model.\n")
    out = subprocess.run(
        [sys.executable, "-m", "trulyopen", "audit", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads((tmp_path / "audit.json").read_text())
    found = {c["name"]: c for c in report["components"]}
    assert found["Model parameters (Final)"]["found"] == "model.safetensors"
    assert found["Model parameters (Final)"]["licence"] == "Apache-2.0"  # from the card, in SPDX spelling
    assert found["Model card"]["status"] == "included"
    assert found["Datasets"]["status"] == "missing" and found["Training code"]["status"] == "missing"
    assert report["class"] == 0 and report["label"] == "Unclassified"
    assert report["osaid"]["Code"]["met"] is False and "Training code" in report["osaid"]["Code"]["missing"]
    assert "class reached: Unclassified" in out.stdout and "Datasets" in out.stdout
