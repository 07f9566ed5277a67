"""The search space file: which recipe fields to tune, over which values, towards which metric.

    metric: pretrain.val_bpb            # <stage>.<name>: a key of RUN_DIR/<stage>/metrics.jsonl
    direction: minimize                 # or maximize
    params:                             # dotted recipe fields, as `--set` names them
      pretrain.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      pretrain.warmup_steps: {type: int, low: 0, high: 20, step: 5}
      pretrain.schedule: {type: categorical, choices: [cosine, wsd]}
    enqueue:                            # optional: settings to try first (e.g. the recipe's own)
      - {pretrain.lr: 3.0e-3}
    sampler: {seed: 0, n_startup_trials: 10}                       # TPE
    pruner: {type: median, n_startup_trials: 5, n_warmup_steps: 0}  # or {type: none}

The file is checked like a recipe (pydantic: an unknown key, a missing bound, low above high is
named by its field), then against the recipe itself: every parameter is set the way `--set` sets
it, at both ends of its range and to each choice, and the recipe must still load. So a misspelt
field or a range the recipe refuses (a negative learning rate) stops the study before any trial.

Each parameter belongs to the stage whose section it changes (`pretrain.*` and `model.*` to
pretrain, `data.*` to data, ...): the stages before the first tuned one are the same for every
trial, so they run once (see trial.py), and a parameter of a stage after the metric's stage could
not move the metric, so it is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trulyopen.errors import UserError, reading
from trulyopen.recipe import Recipe, RecipeError, load_recipe

# the stages that write RUN_DIR/<stage>/metrics.jsonl while they train (train/loop.py)
METRIC_STAGES = ("pretrain", "finetune")


class SpaceError(UserError):
    """A search space file that cannot be used: the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Param(_Strict):
    """A parameter's range; Optuna's distribution checks it (low above high, log of a negative)."""

    @model_validator(mode="after")
    def _optuna_accepts(self) -> _Param:
        try:
            self.distribution()
        except ValueError as e:
            raise ValueError(" ".join(str(e).split())) from None
        return self

    def distribution(self) -> Any:
        raise NotImplementedError


class FloatParam(_Param):
    type: Literal["float"]
    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(default=False, description="Sample on a log scale (learning rates).")
    step: float | None = Field(default=None, gt=0, description="Only multiples of this above low.")

    def distribution(self) -> Any:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Any]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high


class IntParam(_Param):
    type: Literal["int"]
    low: int = Field(description="Smallest value.")
    high: int = Field(description="Largest value.")
    step: int = Field(default=1, ge=1, description="Only multiples of this above low.")
    log: bool = Field(default=False, description="Sample on a log scale.")

    def distribution(self) -> Any:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Any]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[bool | int | float | str | None] = Field(min_length=1, description="The values to try.")

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def probes(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return value in self.choices


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SamplerConfig(_Strict):
    seed: int = Field(default=0, description="The same seed and history give the same suggestions.")
    n_startup_trials: int = Field(
        default=10, ge=0, description="Trials sampled at random before TPE models the results."
    )


class PrunerConfig(_Strict):
    type: Literal["median", "none"] = Field(
        default="median",
        description="median: stop a trial whose value at a step is worse than the median of earlier "
        "trials at that step; none: run every trial to its end.",
    )
    n_startup_trials: int = Field(default=5, ge=0, description="Trials that finish before any is pruned.")
    n_warmup_steps: int = Field(default=0, ge=0, description="Steps of each trial never pruned.")
    interval_steps: int = Field(default=1, ge=1, description="Consider pruning every this many steps.")

    def pruner(self) -> Any:
        import optuna

        if self.type == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(
            n_startup_trials=self.n_startup_trials,
            n_warmup_steps=self.n_warmup_steps,
            interval_steps=self.interval_steps,
        )


class Space(_Strict):
    metric: str = Field(description="<stage>.<name>, e.g. pretrain.val_bpb or finetune.val_loss.")
    direction: Literal["minimize", "maximize"] = Field(description="Whether lower or higher is better.")
    params: dict[str, Param] = Field(min_length=1, description="Dotted recipe field -> its range.")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="Settings to try first; a parameter left out is sampled."
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="The TPE sampler.")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="Stopping bad trials early.")

    @field_validator("metric")
    @classmethod
    def _stage_and_name(cls, metric: str) -> str:
        stage, _, name = metric.partition(".")
        if stage not in METRIC_STAGES or not name:
            raise ValueError(
                f"expected <stage>.<name> with stage {' or '.join(METRIC_STAGES)}, e.g. pretrain.val_bpb"
            )
        return metric

    @model_validator(mode="after")
    def _enqueued_fit(self) -> Space:
        for i, settings in enumerate(self.enqueue):
            for key, value in settings.items():
                if key not in self.params:
                    raise ValueError(f"field 'enqueue.{i}.{key}': not one of params")
                if not self.params[key].contains(value):
                    raise ValueError(f"field 'enqueue.{i}.{key}': {value!r} is outside its range")
        return self

    @property
    def stage(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def metric_name(self) -> str:
        return self.metric.partition(".")[2]

    def distributions(self) -> dict[str, Any]:
        return {key: param.distribution() for key, param in self.params.items()}


def set_override(key: str, value: Any) -> str:
    """`key=value` for `--set`, the value written as YAML so it reads back as the same value (1e-05
    alone would read back as a string in YAML 1.1; a string like "yes" must stay a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)  # a scalar: "VALUE\n...\n"
    return key + "=" + text.removesuffix("\n").removesuffix("...").strip()


def _describe(error: dict) -> str:
    """One pydantic error as `field 'params.pretrain.lr.low': ...` (the union's tag left out)."""
    loc = [str(p) for p in error["loc"] if p not in ("float", "int", "categorical")]
    where = f"field '{'.'.join(loc)}': " if loc else ""  # (a whole-file check names its field itself)
    kind, got = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"{where}unknown key (check the spelling)"
    if kind == "missing":
        return f"{where}required but missing"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return f"{where}needs a type: float, int or categorical"
    msg = error["msg"].removeprefix("Value error, ")
    return f"{where}{msg}" if isinstance(got, dict | list) else f"{where}{msg} (got {got!r})"


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; SpaceError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found; check the path given to --space")
    with reading(path, "search space (YAML)"):  # not YAML, not UTF-8: one line naming the file
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(tree, dict):
        raise SpaceError(f"{path}: expected a mapping (metric:, direction:, params:, ...) at the top level")
    try:
        return Space.model_validate(tree)
    except ValidationError as e:
        raise SpaceError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def stage_of(recipe: Recipe, key: str) -> str | None:
    """The pipeline stage whose config the dotted field `key` is part of (None: no stage's).

    Read off the pipeline's own table of which recipe sections each stage depends on."""
    from trulyopen.pipeline import STAGES

    section = getattr(recipe, key.partition(".")[0], None)
    if section is None:
        return None
    for stage in STAGES:
        if any(s is section for s in stage.sections(recipe)):
            return stage.name
    return None


def check_against_recipe(
    space: Space, space_file: Path, recipe_file: Path, overrides: list[str]
) -> tuple[Recipe, dict[str, str]]:
    """Every parameter, at each end of its range and at each choice, set on the recipe (as `--set`
    does), and the recipe must load; the metric's stage must be in the recipe and come no earlier
    than any tuned stage. Returns the recipe with the user's overrides alone, and each parameter's
    stage."""
    from trulyopen.pipeline import STAGE_NAMES, STAGES

    recipe = load_recipe(recipe_file, overrides)
    stage = next(s for s in STAGES if s.name == space.stage)
    if not stage.enabled(recipe):
        raise SpaceError(
            f"{space_file}: field 'metric': {space.metric}: the recipe {recipe_file} has no {space.stage} "
            "stage; tune a metric of a stage it runs"
        )
    stages = {}
    for key, param in space.params.items():
        where = f"{space_file}: field 'params.{key}'"
        for value in param.probes():
            if isinstance(value, float) and not math.isfinite(value):
                raise SpaceError(f"{where}: {value} is not a finite number")
            try:
                probed = load_recipe(recipe_file, [*overrides, set_override(key, value)])
            except RecipeError as e:
                detail = str(e).removeprefix(f"{recipe_file}: ")
                raise SpaceError(f"{where}: the recipe {recipe_file} refuses {value!r} ({detail})") from None
        stages[key] = stage_of(probed, key)  # (set, a section the recipe leaves out exists)
        if stages[key] is None:
            raise SpaceError(
                f"{where}: not part of any stage's config, so it cannot change {space.metric}; "
                "tune a field of a stage"
            )
        if STAGE_NAMES.index(stages[key]) > STAGE_NAMES.index(space.stage):
            raise SpaceError(
                f"{where}: the {stages[key]} stage runs after {space.stage}, so it cannot change "
                f"{space.metric}; tune a field of {space.stage} or an earlier stage"
            )
    return recipe, stages
