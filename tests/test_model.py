"""Models from presets: every named family builds, trains a step, and exports to transformers."""

import pytest
import torch

from trulyopen.model.build import count_params, flops_per_token, from_preset
from trulyopen.model.export import export_hf
from trulyopen.model.presets import NAMED_FAMILIES, SIZES, ModelSpecError, build_config, resolve_dims


@pytest.mark.parametrize("arch", NAMED_FAMILIES)
def test_family_builds_and_exports_with_identical_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = from_preset(arch, SIZES["tiny"], vocab=512, max_len=64, seed=0).eval()
    assert model.config.model_type == arch
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=x).logits
    out = export_hf(model, None, tmp_path / "hf")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=x).logits
    assert torch.equal(ours, theirs)


def test_same_seed_same_weights_and_moe_counts_active_experts():
    a = from_preset("qwen3_moe", SIZES["tiny"], vocab=512, max_len=64, seed=3)
    b = from_preset("qwen3_moe", SIZES["tiny"], vocab=512, max_len=64, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    counts = count_params(a)
    assert counts.active_non_embedding < counts.non_embedding
    assert counts.total == sum(p.numel() for p in a.parameters())
    dense = from_preset("llama", SIZES["tiny"], vocab=512, max_len=64)
    assert count_params(dense).active_non_embedding == count_params(dense).non_embedding
    assert flops_per_token(dense, 64) > 6 * count_params(dense).non_embedding


def test_tiny_preset_is_about_a_million_parameters_with_the_quickstart_vocabulary():
    model = from_preset("llama", SIZES["tiny"], vocab=8192, max_len=256)
    assert 0.5e6 < count_params(model).total < 2e6


def test_bad_dimensions_and_names_are_named():
    with pytest.raises(
        ModelSpecError, match=r"model.hidden_size \(100\) must be a multiple of model.num_heads \(3\)"
    ):
        resolve_dims("tiny", {"hidden": 100, "heads": 3})
    with pytest.raises(ModelSpecError, match="num_kv_heads"):
        resolve_dims("tiny", {"heads": 4, "kv_heads": 3})
    with pytest.raises(ModelSpecError, match="unknown preset 'huge'"):
        resolve_dims("huge", {})
    with pytest.raises(ModelSpecError, match="'gpt9' is not a transformers model type"):
        build_config("gpt9", SIZES["tiny"], 512, 64)
    assert resolve_dims(None, {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}).kv_heads == 2
