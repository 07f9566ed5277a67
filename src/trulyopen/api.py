"""The public Python API: what the `trulyopen` verbs do, as functions a notebook or a script calls.

    the command                                 the function (import trulyopen as to)
    trulyopen run RECIPE --set k=v              to.run(RECIPE, ["k=v"])
    trulyopen data|pretrain|synth|finetune R    to.run(R, until="index"|"pretrain"|"synth"|"finetune")
    trulyopen eval MODEL --tasks SUITE          to.evaluate_model(MODEL, tasks=SUITE)
    trulyopen release RUN_DIR                   to.release_run(RUN_DIR)
    trulyopen audit DIR   /   verify DIR        to.audit(DIR)   /   to.verify(DIR), to.replay(DIR, STEP)
    trulyopen export CHECKPOINT --out DIR       to.export(CHECKPOINT, DIR)
    trulyopen report RUN_DIR                    to.report(RUN_DIR)
    trulyopen generate MODEL "prompt"           to.generate(MODEL, "prompt")   (or to.load_model once)
    trulyopen serve MODEL                       with to.start_server(MODEL) as server: ...server.base_url
    (reading a run)                             to.load_recipe(...), to.metrics(RUN_DIR), to.eval_results(DIR)

The command calls these same functions, so a notebook and a terminal make the same files, and a
mistake in the input raises the same one-line `trulyopen.errors.UserError` (RecipeError, ...) that
the command prints. A recipe is a YAML file, a dict of its fields (relative paths against the
current directory), or a `Recipe` that `load_recipe` gave. Nothing heavy is imported until a
function runs: `import trulyopen` stays quick.

The names steer clear of trulyopen's packages (`trulyopen.evaluate`, `.release`, `.serve`, ...):
`trulyopen.X` must mean one thing whichever modules were imported before.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from trulyopen import _API, errors
from trulyopen.locate import check_model

if TYPE_CHECKING:
    from trulyopen.recipe import Recipe
    from trulyopen.release.audit import Audit
    from trulyopen.release.verify import Report
    from trulyopen.serve.launch import Background

__all__ = list(_API)  # the list lives in trulyopen/__init__.py, which cannot import this module

# ----------------------------------------------------------------------------- recipes and runs


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe (a YAML file, a dict of its fields, or a `Recipe`), with dotted
    overrides as `--set` takes them: `load_recipe("recipes/quickstart.yaml", ["pretrain.max_steps=4"])`."""
    from trulyopen.recipe import Recipe, recipe_from_tree
    from trulyopen.recipe import load_recipe as load_file

    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        return recipe_from_tree(recipe.model_dump(mode="json"), list(overrides), f"recipe {recipe.name!r}")
    if isinstance(recipe, Mapping):
        where = f"recipe {recipe.get('name')!r}" if recipe.get("name") else "recipe"
        return recipe_from_tree(copy.deepcopy(dict(recipe)), list(overrides), where)
    return load_file(recipe, list(overrides))


def run(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    until: str | None = None,
    force: Sequence[str] = (),
    workers: int | None = None,
    why: str | None = None,
    parents: Sequence[str] = (),
) -> Path:
    """Run the recipe's stages in order (`until` the named one: data, tokenizer, shards, index,
    pretrain, vlm, synth, finetune, eval, release), skipping those already up to date, and return the
    run directory (default: runs/<name>/). `force` redoes the named stages and every stage after them.
    `why` (the reason for this run) and `parents` (the runs it came from; default: the closest earlier
    run of the project) go to the project's history."""
    from trulyopen import pipeline

    r = load_recipe(recipe, overrides)
    out = Path(run_dir) if run_dir else pipeline.default_run_dir(r)
    errors.set_run_dir(out)  # a crash report goes there
    return pipeline.run(
        r, out, until=until, force=list(force), workers=workers, why=why, parents=list(parents) or None
    )


def release_run(
    target: str | Path | Mapping[str, Any] | Recipe,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    force: Sequence[str] = (),
    workers: int | None = None,
) -> Path:
    """Release a run (a run directory, or a recipe): the stages before it that are not up to date run
    first; a recipe without a `release` section gets its defaults. Returns RUN_DIR/release."""
    import yaml

    overrides = list(overrides)
    tree: Any = target  # a dict, or a Recipe
    if isinstance(target, str | Path):
        target = Path(target)
        if not target.exists():
            raise errors.missing(target, "run directory or recipe", "give a run directory or a recipe file")
        if target.is_dir():
            if not (target / "recipe.yaml").is_file():
                raise errors.UserError(
                    f"{target}: no recipe.yaml, so not a run directory; give a run directory"
                )
            run_dir, target = run_dir or target, target / "recipe.yaml"
        try:
            tree = yaml.safe_load(target.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            pass  # load_recipe names what is wrong with it
    if (isinstance(tree, Mapping) and "release" not in tree) or getattr(tree, "release", True) is None:
        overrides.append("release={}")  # a recipe without a release section: the defaults
    return run(target, overrides, run_dir=run_dir, force=force, workers=workers, until="release") / "release"


def metrics(run_dir: str | Path, stage: str = "pretrain") -> list[dict]:
    """The lines of RUN_DIR/<stage>/metrics.jsonl (pretrain, vlm or finetune): one per step, with
    `step`, `loss`, `lr`, ..., and `val_loss` / `val_bpb` at each validation."""
    path = Path(run_dir) / stage / "metrics.jsonl"
    if not path.is_file():
        raise errors.missing(path, f"{stage} metrics", f"has the {stage} stage of this run finished?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: str | Path,
    tasks: str | Path | None = None,
    *,
    out: str | Path | None = None,
    lm_eval: Sequence[str] = (),
    include_path: str | Path | None = None,
    contamination: Sequence[str | Path] = (),
) -> dict:
    """Evaluate a model (a run directory, a checkpoint, a Hugging Face directory or hub name) on a
    task suite YAML and/or lm-eval tasks; results and per-item records go to `out` (default:
    runs/eval/<model>/). Returns the suite's results (`["tasks"][name]["metrics"][metric]["value"]`),
    with each task's n-gram overlap with the `contamination` corpora under "contamination" and
    lm-eval's results under "lm_eval". (A run's own eval stage: `run(recipe, until="eval")`.)"""
    from trulyopen.evaluate.taskfile import load_suite

    # what is wrong with the arguments is said before torch is even imported
    if tasks is None and not lm_eval:
        raise errors.UserError("give a task suite (tasks=SUITE.yaml) or lm-eval task names (lm_eval=[...])")
    check_model(model)
    specs = load_suite(Path(tasks)) if tasks is not None else []
    for path in [*contamination, *([include_path] if include_path else [])]:
        if not Path(path).exists():
            raise errors.missing(
                path, "file or directory", "check the path given to --contamination / --include-path"
            )
    from trulyopen.evaluate import models
    from trulyopen.evaluate.runner import evaluate_suite

    em = models.load(model)
    out = Path(out) if out else Path("runs") / "eval" / Path(em.source).name
    results: dict = {"model": em.name, "loaded": em.source, "tasks": {}}
    if specs:
        results = evaluate_suite(em, specs, out)
        if contamination:
            from trulyopen.evaluate.contamination import contamination_report
            from trulyopen.files import write_json

            results["contamination"] = contamination_report(
                {t.name: t.path for t in specs},
                {t.name: t.type for t in specs},
                [Path(c) for c in contamination],
            )
            write_json(out / "contamination.json", results["contamination"])
            for name, r in results["contamination"].items():
                print(f"contamination: {name}: {r}")
    if lm_eval:
        from trulyopen.evaluate.harness import run_lm_eval

        include = Path(include_path) if include_path else None
        results["lm_eval"] = run_lm_eval(em, list(lm_eval), out / "lm_eval", include)
    return results


def eval_results(path: str | Path) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from a results.json, or from the folder that holds it (an evaluation's
    `out`, RUN_DIR/eval/<stage>/ of a run's eval stage)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise errors.missing(file, "evaluation results", "evaluate the model first")
    tasks = json.loads(file.read_text(encoding="utf-8"))["tasks"]
    return {name: {m: v["value"] for m, v in task["metrics"].items()} for name, task in tasks.items()}


# ----------------------------------------------------------------------------- release


def audit(directory: str | Path, output: str | Path | None = None) -> Audit:
    """Score a directory (a release, a Hugging Face model folder) against the Model Openness
    Framework and write the audit (default: DIRECTORY/audit.json); `.label`, `.cls`, `.table()`."""
    from trulyopen.release.audit import audit as run_audit
    from trulyopen.release.audit import write

    result = run_audit(directory)
    write(result, Path(output) if output else Path(directory) / "audit.json")
    return result


def verify(directory: str | Path) -> Report:
    """Check a release's every hash (SHA256SUMS, the ledger) and that each checkpoint's data
    fingerprint, recipe and code version agree: `.checked` files, `.problems` (empty when it holds)."""
    from trulyopen.release.verify import verify as run_verify

    return run_verify(directory)


def trace(target: str | Path, text: str, **options: Any) -> dict:
    """The spans of `text` found verbatim in the training data of a release or run (its trace index),
    each with its count and a few documents (id, source, licence, context). Options: min_len, keep,
    docs_per_span, context_tokens (trulyopen.trace.spans.TraceOptions)."""
    from trulyopen.trace.spans import TraceOptions, Tracer, find_index

    return Tracer(*find_index(target)).trace(text, TraceOptions(**options))


def ngram(target: str | Path, prefix: str, top: int = 10) -> dict:
    """How often `prefix` occurs in a release's or run's training data, and the tokens that follow."""
    from trulyopen.trace.spans import Tracer, find_index

    return Tracer(*find_index(target)).ngram(prefix, top)


def replay(directory: str | Path, step: int, stage: str = "pretrain") -> dict:
    """Retrain a release's `stage` (pretrain or finetune) to `step` from the checkpoint before it and
    compare with the released weights: `["identical"]`, `["max_abs_diff"]`, `["where"]`."""
    from trulyopen.release.verify import replay as run_replay

    if stage not in ("pretrain", "finetune"):
        raise errors.UserError(f"--stage {stage}: give pretrain or finetune")
    return run_replay(directory, step, stage=stage)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One self-contained HTML page on a run (curves, data funnel, evaluation, openness), its figures
    beside it (default: RUN_DIR/report/); returns the page."""
    from trulyopen.release.report import report as write_report

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise errors.missing(run_dir, "run directory", "give a run directory, e.g. runs/quickstart")
    if not (run_dir / "ledger.jsonl").exists():
        raise errors.UserError(f"{run_dir}: no ledger.jsonl, so not a trulyopen run directory")
    return write_report(run_dir, Path(out) if out else None)


def export(checkpoint: str | Path, out: str | Path, format: str = "hf", quant: str | None = None) -> Path:
    """Write a model in the Hugging Face format (an adapter checkpoint: merged, and the adapter alone
    in OUT/adapter; `quant` int8 or nf4 for GPUs) or as GGUF for llama.cpp and Ollama (`quant`: f32,
    f16, bf16, q8_0, q4_k_m). Returns what was written: the directory, or the GGUF file."""
    if format not in ("hf", "gguf"):
        raise errors.UserError(f"--format {format}: choose hf or gguf")
    checkpoint, out = Path(checkpoint), Path(out)
    check_model(checkpoint)  # a wrong path is named before torch is even imported
    if format == "gguf":
        from trulyopen.model.gguf import export_gguf

        return export_gguf(checkpoint, out, quant or "f16")
    from trulyopen.model.export import export_checkpoint

    if quant is None:
        export_checkpoint(checkpoint, out)
        return out
    import tempfile

    from trulyopen.locate import locate
    from trulyopen.model.quantize_hf import QUANTS, export_hf_quantized

    if quant not in QUANTS:
        raise errors.UserError(
            f"--quant {quant}: not a Hugging Face quantization (choose {', '.join(QUANTS)})"
        )
    found = locate(checkpoint)
    with tempfile.TemporaryDirectory(prefix="trulyopen-export-") as scratch:
        hf_dir = Path(found.path)
        if found.kind == "checkpoint":
            hf_dir = export_checkpoint(hf_dir, Path(scratch) / "hf")
        export_hf_quantized(hf_dir, out, quant)
    return out


# ----------------------------------------------------------------------------- inference


class LoadedModel(NamedTuple):
    """A model ready to generate: in eval mode, in the chosen precision, on the GPU where there is
    one (a vision-language model comes as a `trulyopen.vlm.generate.VLM`)."""

    model: Any
    tokenizer: Any
    name: str


def load_model(model: str | Path, precision: str = "auto") -> LoadedModel:
    """Load a run directory (its newest checkpoint), a release, a checkpoint, a Hugging Face directory
    or hub name; `precision` auto (bf16 where the hardware runs it fast), bf16 or fp32."""
    check_model(model)  # a wrong path is named before torch is even imported
    from trulyopen.serve.launch import load

    return LoadedModel(*load(str(model), precision))


def generate(
    model: LoadedModel | str | Path,
    prompt: str,
    *,
    max_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int | None = None,
    precision: str = "auto",
    echo: bool = True,
) -> str:
    """Continue `prompt` (temperature 0 is greedy; the same seed gives the same text) and return the
    continuation; `echo` prints the prompt and the text as it comes, as `trulyopen generate` does."""
    import io
    import sys

    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.serve.terminal import generate_text

    loaded = model if isinstance(model, LoadedModel) else load_model(model, precision)
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    out = sys.stdout if echo else io.StringIO()
    out.write(prompt)
    return generate_text(loaded.model, loaded.tokenizer, prompt, params, out=out)


def start_server(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    api_key: str | None = None,
    precision: str = "auto",
    max_len: int | None = None,
    engine: str = "trulyopen",
    **limits: Any,
) -> Background:
    """Serve `model` behind the OpenAI-compatible API on a thread of this process (a free port unless
    given) and return once it answers; `.base_url` is what `openai.OpenAI(base_url=...)` takes,
    `.name` the model's id, `.stop()` ends it (or use it as a context manager). `limits` are
    `trulyopen.serve.app.Limits`' fields (max_concurrent, max_tokens, ...); `engine` trulyopen or
    llama.cpp."""
    if engine not in ("trulyopen", "llama.cpp"):
        raise errors.UserError(
            f"engine={engine!r}: choose trulyopen or llama.cpp (vLLM and SGLang: `trulyopen serve`)"
        )
    check_model(model)  # a wrong path is named before torch is even imported
    from trulyopen.serve.app import Limits
    from trulyopen.serve.launch import Background

    return Background(
        str(model),
        host,
        port,
        limits=Limits(**limits),
        api_key=api_key,
        precision=precision,
        max_len=max_len,
        engine=engine,
    )
