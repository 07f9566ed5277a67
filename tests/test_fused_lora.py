"""The fused LoRA path computes what peft computes: same loss, same gradients, same dropout masks."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from trulyopen.train import cpu_dropout, fused_lora

from .conftest import tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_pair(dropout: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A peft LoRA model (B not zero, so every gradient is) and a copy with the fused path."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(60, attention_bias=True))  # q/k/v/o with a frozen bias
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    cpu_dropout.install(peft)
    fused = copy.deepcopy(peft)
    assert fused_lora.install(fused) == 7 * model.config.num_hidden_layers
    return peft.train(), fused.train()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> tuple[float, dict]:
    torch.manual_seed(7)  # the dropout masks come from torch's generator
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_equals_peft_in_fp32(dropout):
    peft, fused = lora_pair(dropout)
    ids = torch.randint(0, 60, (2, 24))
    loss, grads = loss_and_grads(peft, ids, torch.float32)
    fused_loss, fused_grads = loss_and_grads(fused, ids, torch.float32)
    assert fused_loss == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        assert g.abs().sum() > 0, name  # every adapter weight gets a gradient
        assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_fused_lora_in_bf16_autocast_matches_peft_and_draws_the_same_masks():
    peft, fused = lora_pair(0.1)
    ids = torch.randint(0, 60, (2, 24))
    loss, grads = loss_and_grads(peft, ids, torch.bfloat16)
    fused_loss, fused_grads = loss_and_grads(fused, ids, torch.bfloat16)
    # the scale and the add run inside one GEMM (fp32 accumulation) instead of two bf16 passes
    assert fused_loss == pytest.approx(loss, rel=1e-2)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, name  # a different mask would leave the two far apart
    # another seed draws other masks: the agreement above is the masks', not dropout being off
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = fused(input_ids=ids, labels=ids).loss.item()
    assert other != pytest.approx(fused_loss, rel=1e-4)


def test_fused_lora_leaves_eval_saving_and_merging_to_peft():
    peft, fused = lora_pair(0.1)
    ids = torch.randint(0, 60, (1, 12))
    peft.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids).logits, fused(input_ids=ids).logits)  # peft's own forward
    assert peft.state_dict().keys() == fused.state_dict().keys()
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert type(copy.deepcopy(layer)) is type(layer)  # a copy keeps the fused path
    with torch.no_grad():
        merged = fused.merge_and_unload()(input_ids=ids).logits
        assert torch.allclose(merged, peft(input_ids=ids).logits, atol=1e-5)
