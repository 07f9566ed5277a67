"""The load-balancing loss of a mixture-of-experts model, added to the language-model loss.

Without it a router learns to send most tokens to a few experts: the rest stop learning, and the
model behaves like a smaller dense one. Switch Transformer's loss (eqs. 4-6) pushes the share of
tokens routed to each expert and the router's mean probability for it towards uniform:

    aux = E * sum_e (routings to e / tokens) * (mean router probability of e)    (k when uniform,
                                                                                    k experts a token)
    loss = cross-entropy + coef * aux

transformers adds it itself when it computes the loss (`output_router_logits`), but only from the
2D padding mask it was given, and our pretraining passes a 4D block-diagonal document mask. So the
router logits are collected here by forward hooks on the family's router modules (the class the model
records as `router_logits`), and the family's own `load_balancing_loss_func` gets no mask: every
position of a packed pretraining row is a real token. The coefficient is the model config's
`router_aux_loss_coef` (Qwen3-MoE and Mixtral 0.001, OLMoE 0.01; set it with
`model.config_overrides`). Families without such a loss (DeepSeek-V3 balances with a bias instead)
get none.
"""

from __future__ import annotations

import sys

import torch


class RouterBalance:
    def __init__(self, model: torch.nn.Module, recorder, loss_fn, coef: float):
        self.loss_fn, self.coef = loss_fn, coef
        self.experts = getattr(model, "num_experts", None) or model.config.num_local_experts
        self.top_k = model.num_experts_per_tok
        self.logits: list[torch.Tensor] = []
        index = recorder.index

        def keep(_module, _args, out) -> None:
            if torch.is_grad_enabled():  # training passes only: validation's would pile up
                self.logits.append(out[index] if isinstance(out, tuple) else out)

        for module in model.modules():
            if isinstance(module, recorder.target_class):
                module.register_forward_hook(keep)

    @classmethod
    def of(cls, model: torch.nn.Module) -> RouterBalance | None:
        """The loss for `model` (unwrapped, before DDP, FSDP or compile), or None for a dense model or
        a family that has no such loss."""
        recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
        loss_fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        coef = getattr(model.config, "router_aux_loss_coef", None)
        if recorder is None or loss_fn is None or not coef or not hasattr(model, "num_experts_per_tok"):
            return None
        return cls(model, recorder, loss_fn, float(coef))

    def start(self) -> None:
        """Before a forward pass: forget any logits a pass left that was not followed by loss()."""
        self.logits.clear()

    def loss(self) -> tuple[torch.Tensor, float]:
        """(coef * aux to add to the loss, aux itself to log) over the routers of the forward pass
        since start(); and forget them."""
        aux = self.loss_fn(tuple(self.logits), self.experts, self.top_k, None)
        self.logits.clear()
        return self.coef * aux, aux.item()
