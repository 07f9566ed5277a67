"""Checkpoints: everything a run needs to continue to the same bits, written atomically.

    checkpoints/<stage>/step_000050/
        config.json         the transformers config: the model can be rebuilt from the checkpoint alone
        model.safetensors   weights (fp32 master copy)
        optimizer.pt        optimizer state (tensors and numbers only: loaded with weights_only=True)
        rng.pt              torch RNG states
        state.json          step, tokens seen, data fingerprint, config hash, code version

A checkpoint is written into `step_000050.tmp/` and renamed when complete, so a directory without
`.tmp` is always whole; `newest()` ignores anything else. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from trulyopen.files import write_json

PREFIX = "step_"


def path_for(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory's name, or None for anything else (e.g. a .tmp directory)."""
    tail = path.name[len(PREFIX) :]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / "state.json").exists()]
    return sorted(found, key=step_of)


def newest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def save(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write checkpoint `step` under `root` and return its directory."""
    final = path_for(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.to_json_file(str(tmp / "config.json"))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
    write_json(tmp / "state.json", {**state, "step": step})  # last: its presence marks a whole checkpoint
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights (and optimizer and RNG state) from `path`; return its state.json."""
    load_model(model, str(path / "model.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
    return json.loads((path / "state.json").read_text())


def thin(root: Path, keep_multiple: int) -> None:
    """Delete checkpoints whose step is not a multiple of `keep_multiple`, always keeping the newest."""
    for p in complete(root)[:-1]:
        if step_of(p) % keep_multiple:
            shutil.rmtree(p)


def load_for_inference(path: Path) -> torch.nn.Module:
    """The model of checkpoint `path`, rebuilt from its own config.json, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: not a trulyopen checkpoint (needs config.json and model.safetensors)"
        )
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    load_model(model, str(path / "model.safetensors"))
    return model.eval()
