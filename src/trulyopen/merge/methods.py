"""The tensor math of merging, one tensor at a time: mergekit's own merge method functions.

    linear  Σ wᵢ·θᵢ / Σ wᵢ                     a weighted average ("model soup"); without
                                                `normalize`, Σ wᵢ·θᵢ as given
    slerp   θ₀ → θ₁ along the great circle      the angle between the two tensors (flattened) sets
                                                the path; nearly parallel (|cos| > 0.9995) or a zero
                                                tensor: linear interpolation instead
    ties    θ_base + Σ' wᵢ·τ̂ᵢ / Σ' wᵢ           τᵢ = θᵢ - θ_base, trimmed to its `density` largest
                                                magnitudes (τ̂ᵢ); per element the sign of Σ wᵢ·τ̂ᵢ
                                                is elected and Σ' keeps the models that agree with it

These are the definitions and defaults of mergekit (PyPI `mergekit`, the `merge` extra), whose
functions do the arithmetic here, so that a merge made by trulyopen is a merge mergekit would make:
`normalize` is on by default for linear and ties, `density` is 1 (no trimming) unless given.
Everything is computed in float32 (float64 stays float64) and written in the dtype of the first
model (the base, for ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trulyopen.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are merged: the options are checked without it
    import torch

METHODS = ("linear", "slerp", "ties")


class MergeError(UserError):
    """Models that cannot be merged, or a merge asked for wrongly; the message names which and why."""


@dataclass(frozen=True)
class Method:
    """A merge method and its parameters, checked: `weights` has one weight per merged model (the
    base of ties not counted)."""

    name: str
    weights: tuple[float, ...]
    t: float = 0.5  # slerp: 0 gives the first model, 1 the second
    density: float = 1.0  # ties: the share of each task vector kept, by magnitude
    normalize: bool = True  # linear and ties: divide by the sum of the weights

    def parameters(self) -> dict:
        """What the ledger records: the parameters this method uses."""
        if self.name == "slerp":
            return {"t": self.t}
        out = {"weights": list(self.weights), "normalize": self.normalize}
        return {**out, "density": self.density} if self.name == "ties" else out


def method(
    name: str,
    models: int,
    weights: list[float] | None = None,
    t: float | None = None,
    density: float | None = None,
    normalize: bool = True,
    base: bool = False,
) -> Method:
    """Check the options of `trulyopen merge` against the method (before any model is read)."""
    if name not in METHODS:
        raise MergeError(f"--method {name}: not a merge method (choose {', '.join(METHODS)})")
    if name == "ties" and not base:
        raise MergeError("--method ties: give --base, the model the merged ones were fine-tuned from")
    if name != "ties" and base:
        raise MergeError(f"--base: only ties merges task vectors relative to a base, not {name}")
    if name == "slerp" and models != 2:
        raise MergeError(f"--method slerp: give exactly two models (from t=0 to t=1), not {models}")
    if name != "ties" and models < 2:
        raise MergeError(f"--method {name}: give at least two models to merge")
    if name == "ties" and models < 1:
        raise MergeError("--method ties: give at least one model besides --base")
    if weights is not None and name == "slerp":
        raise MergeError("--weights: slerp has no weights; --t says where between the two models to be")
    if weights is not None and len(weights) != models:
        raise MergeError(f"--weights: {len(weights)} weights for {models} models; give one per model")
    if weights is not None and name != "ties" and normalize and sum(weights) == 0:
        raise MergeError("--weights: they sum to 0, so they cannot be normalised; use --no-normalize")
    if t is not None and name != "slerp":
        raise MergeError(f"--t: only slerp interpolates between two models, not {name}")
    if density is not None and name != "ties":
        raise MergeError(f"--density: only ties trims task vectors, not {name}")
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"--density {density}: give a share of each task vector in (0, 1]")
    return Method(
        name,
        tuple(weights) if weights is not None else (1.0,) * models,
        0.5 if t is None else t,
        1.0 if density is None else density,
        normalize,
    )


def merge_tensor(
    m: Method, tensors: list[torch.Tensor], base: torch.Tensor | None = None, name: str = "tensor"
) -> torch.Tensor:
    """Merge tensor `name` of every model (and of `base`, for ties). A tensor that is not floating
    point (an integer buffer) is copied when every model has the same, and refused otherwise."""
    import torch
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.buffers import copy_non_floating_buffer

    inputs = [*([] if base is None else [base]), *tensors]
    try:
        copied = copy_non_floating_buffer(inputs)
    except ValueError:
        raise MergeError(
            f"{name}: an integer tensor that differs between the models cannot be merged"
        ) from None
    if copied is not None:
        return copied
    first = inputs[0].dtype
    compute = torch.float64 if first == torch.float64 else torch.float32
    if m.name == "linear":
        parameters = {"weight": list(m.weights), "normalize": m.normalize}
        return merge_tensors(inputs, "linear", parameters=parameters, dtype=compute, out_dtype=first)
    if m.name == "slerp":  # mergekit's slerp goes from its base (t=0) to the other model (t=1)
        return merge_tensors(
            inputs, "slerp", parameters={"t": m.t}, base_index=0, dtype=compute, out_dtype=first
        )
    parameters = {"weight": list(m.weights), "density": m.density, "normalize": m.normalize}
    return merge_tensors(inputs, "ties", parameters=parameters, base_index=0, dtype=compute, out_dtype=first)


def mergekit_version() -> str:
    """mergekit's version, or a one-line error saying how to install it (found without importing
    it: a merge refused for its inputs does not wait for mergekit's imports)."""
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec("mergekit") is None:
        raise MergeError(
            "trulyopen merge computes with mergekit, not installed; pip install 'trulyopen[merge]'"
        )
    return metadata.version("mergekit")
