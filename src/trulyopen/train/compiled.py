"""torch.compile for training (`compile: true`): the model's graph, less its rotary embedding.

transformers computes a model's rotary embedding (cos and sin of every position) once per forward
pass and hands it to every layer. Inductor, seeing cheap elementwise work, does not keep it: it
recomputes cos and sin inside each layer's fused query and key kernels, forward and backward, so
a step of an 8-layer model computes them 32 times a micro-batch. Left out of the graph (a graph
break at the rotary module), they are computed once per pass, eagerly, and read as an input. On the
benchmark model (benchmarks/train_throughput.py) that is 3-6% of a compiled step on a 2-core EPYC.

Not under peft: its forward runs the model inside a context manager that dynamo cannot break in,
so the break would send the whole adapted forward back to eager mode.
"""

from __future__ import annotations

import torch


def compile_for_training(train_model: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(train_model) (the model as DDP or FSDP wrapped it), with `model`'s rotary
    embedding modules run eagerly."""
    if not hasattr(model, "peft_config"):  # (a peft model: see above)
        for module in model.modules():
            if type(module).__name__.endswith("RotaryEmbedding"):
                module.forward = torch.compiler.disable(module.forward)
    return torch.compile(train_model)
