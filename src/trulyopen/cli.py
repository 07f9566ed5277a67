"""The `trulyopen` command: one verb per stage, plus `run` for the whole pipeline and `inspect`."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from trulyopen import errors


class _Contract(TyperGroup):
    """Every verb under the error contract of `trulyopen.errors`: a user's mistake is one line and
    exit 2, a bug one line naming a crash report and exit 1, Ctrl-C one line and exit 130. (Here, not
    only in `main`, so that the app behaves the same when a test invokes it.)"""

    def invoke(self, ctx):
        from typer.exceptions import TyperException

        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(_interrupted()) from None
        except Exception as e:
            raise typer.Exit(_failed(e)) from None


def _failed(e: Exception) -> int:
    """Say what went wrong in one line; the exit status."""
    if _ctrl_c_seen:  # a library turned the KeyboardInterrupt into an error of its own, such as an
        return _interrupted()  # extension module's "ImportError: initialization failed"
    if isinstance(e, errors.UserError):
        return _fail(str(e))
    if isinstance(e, OSError) and (message := errors.os_error_message(e)):
        return _fail(message)
    return _crash(e)


app = typer.Typer(
    cls=_Contract,
    help="trulyopen: from raw text to a released language model in which every artifact is verifiable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/quickstart.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: --set data.dedup.threshold=0.8 (repeatable)."),
]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<recipe name>/).")
]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="Redo this stage and every stage after it (repeatable).")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="Worker processes (default: recipe's workers, else one per core)."),
]


WhyOpt = Annotated[
    str | None, typer.Option("--why", help="Why this run: kept in the project's history (trulyopen history).")
]
ParentOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--parent", help="The run this one came from (default: the closest earlier run of the project)."
    ),
]


def _run(recipe: Path, overrides, run_dir, force, workers, until: str | None, why=None, parent=None) -> Path:
    from trulyopen import api

    return api.run(
        recipe,
        overrides or [],
        run_dir=run_dir,
        until=until,
        force=force or [],
        workers=workers,
        why=why,
        parents=parent or [],
    )


@app.command()
def run(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """Run every available stage of a recipe, skipping those already up to date."""
    out = _run(recipe, set, run_dir, force, workers, until=None, why=why, parent=parent)
    _say_release(out)
    typer.echo(f"run directory: {out}  (see `trulyopen inspect {out}` and {out}/data/DATACARD.md)")
    if (out / "checkpoints").is_dir():
        typer.echo(f"serve the model: trulyopen serve {out}   (or chat with it: trulyopen chat {out})")


@app.command()
def data(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """The data pipeline: curate the sources, train the tokenizer, write token shards and the data card,
    and the trace index where the recipe has `index:`."""
    out = _run(recipe, set, run_dir, force, workers, until="index", why=why, parent=parent)
    typer.echo(f"data card: {out}/data/DATACARD.md")


@app.command()
def tokenizer(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """Curate the data (if needed) and train or reuse the tokenizer."""
    out = _run(recipe, set, run_dir, force, workers, until="tokenizer", why=why, parent=parent)
    typer.echo(f"tokenizer: {out}/tokenizer")


@app.command()
def pretrain(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """Pretrain the model on the run's shards (running the data stages first if needed)."""
    _run(recipe, set, run_dir, force, workers, until="pretrain", why=why, parent=parent)


@app.command()
def synth(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """Derive post-training data (instructions, preference pairs, verifiable prompts) from the corpus."""
    out = _run(recipe, set, run_dir, force, workers, until="synth", why=why, parent=parent)
    typer.echo(f"synth: {out}/synth (see {out}/synth/SYNTHCARD.md)")


@app.command()
def finetune(
    recipe: RecipeArg,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
    why: WhyOpt = None,
    parent: ParentOpt = None,
):
    """Post-train (SFT, DPO, KTO, ORPO, SimPO, reward model, distillation, GRPO; full, LoRA or QLoRA) a
    trulyopen checkpoint or a Hugging Face model."""
    _run(recipe, set, run_dir, force, workers, until="finetune", why=why, parent=parent)


@app.command()
def tune(
    recipe: RecipeArg,
    space: Annotated[
        Path, typer.Option("--space", help="The search space YAML file (see recipes/quickstart.tune.yaml).")
    ],
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials to finish (a rerun resumes).")],
    study_dir: Annotated[
        Path | None,
        typer.Option("--study-dir", help="Where the study lives (default: runs/<recipe name>-tune/)."),
    ] = None,
    set: Annotated[
        list[str] | None,
        typer.Option("--set", "-o", help="Override a recipe field in every trial (repeatable)."),
    ] = None,
):
    """Search hyperparameters with Optuna (TPE, median pruning): each trial is a run of the recipe in
    STUDY_DIR/trial-NNNN with the trial's overrides; results.md, study.json, study.png and the best
    recipe (best.yaml) are written as it goes. Rerun the same command to resume a stopped study."""
    from trulyopen.tune import tune as run_tune

    run_tune(recipe, space, trials, study_dir, set or [])


@app.command("eval")
def eval_(
    target: Annotated[
        str,
        typer.Argument(
            help="A recipe (runs its eval stage), a run directory, a checkpoint, or a Hugging Face model."
        ),
    ],
    tasks: Annotated[Path | None, typer.Option("--tasks", help="A task suite YAML file.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write results (default: beside the model).")
    ] = None,
    lm_eval: Annotated[
        str | None,
        typer.Option("--lm-eval", help="Comma-separated lm-eval task names, run through its harness."),
    ] = None,
    include_path: Annotated[
        Path | None,
        typer.Option("--include-path", help="With --lm-eval: a directory of extra task YAML files."),
    ] = None,
    contamination: Annotated[
        list[Path] | None,
        typer.Option(
            "--contamination", help="Report each task's n-gram overlap with this corpus (repeatable)."
        ),
    ] = None,
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
):
    """Evaluate a model on a task suite (multiple choice, generation, code, bits per byte), or through
    lm-eval's harness; with a recipe, run the recipe's eval stage."""
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        _run(Path(target), set, run_dir, ["eval"], None, until="eval")
        return
    from trulyopen import api

    if tasks is None and lm_eval is None:
        raise typer.BadParameter("give --tasks SUITE.yaml or --lm-eval TASKS")
    names = lm_eval.split(",") if lm_eval is not None else []
    api.evaluate_model(
        target, tasks, out=out, lm_eval=names, include_path=include_path, contamination=contamination or []
    )


@app.command()
def export(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint (e.g. runs/x/checkpoints/pretrain/step_000060), a run or release directory, "
            "or (for gguf and quantized hf) a Hugging Face model directory."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The directory to write into.")],
    format: Annotated[
        str, typer.Option("--format", help="hf (transformers) or gguf (llama.cpp, Ollama).")
    ] = "hf",
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="gguf: f32, f16 (default), bf16, q8_0, q4_k_m. hf: int8 or nf4 (bitsandbytes), "
            "default none.",
        ),
    ] = None,
):
    """Write a model in the Hugging Face format (config, safetensors, tokenizer, generation config; an
    adapter checkpoint gives the merged model and the adapter alone in OUT/adapter), quantized for GPUs
    with --quant int8|nf4; or as one GGUF file for llama.cpp with an Ollama Modelfile beside it."""
    if format not in ("hf", "gguf"):
        raise typer.BadParameter(f"--format {format}: choose hf or gguf")
    from trulyopen import api

    written = api.export(checkpoint, out, format, quant)
    if format == "gguf":
        typer.echo(f"exported {checkpoint} to {written} (Ollama: ollama create NAME -f {out / 'Modelfile'})")
    else:
        typer.echo(f"exported {checkpoint} to {out}")


@app.command()
def merge(
    models: Annotated[
        list[str],
        typer.Argument(
            help="The models to merge: checkpoints (an adapter checkpoint is merged into its base first), "
            "run or release directories, Hugging Face model directories or hub names; one architecture."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The directory to write the merged model into.")],
    method: Annotated[str, typer.Option("--method", help="linear, slerp or ties (as mergekit).")] = "linear",
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="linear, ties: one weight per model, e.g. 0.3,0.7 (default: all 1)."),
    ] = None,
    t: Annotated[
        float | None,
        typer.Option(
            "--t", min=0.0, max=1.0, help="slerp: 0 gives the first model, 1 the second (default 0.5)."
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="ties: the model the merged ones were fine-tuned from.")
    ] = None,
    density: Annotated[
        float | None,
        typer.Option("--density", help="ties: the share of each task vector kept, by magnitude (default 1)."),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option("--normalize/--no-normalize", help="linear, ties: divide by the sum of the weights."),
    ] = True,
):
    """Merge models of one architecture into one Hugging Face model directory: `linear` (a weighted
    average, e.g. a soup of one run's checkpoints), `slerp` (spherical interpolation of two models),
    or `ties` (task vectors relative to --base, trimmed, sign-elected, merged). The tensor math is
    mergekit's; OUT/ledger.jsonl records every input's hash, the method and its parameters."""
    from trulyopen.merge.methods import MergeError
    from trulyopen.merge.methods import method as check_method

    try:
        weight_list = [float(w) for w in weights.split(",")] if weights is not None else None
    except ValueError:
        raise MergeError(f"--weights {weights}: give numbers separated by commas, e.g. 0.3,0.7") from None
    spec = check_method(method, len(models), weight_list, t, density, normalize, base is not None)
    for target in [*models, *([base] if base else [])]:
        _locate(target)  # a wrong path is named before torch is even imported
    from trulyopen.merge.stage import merge_models

    written = merge_models(models, spec, out, base)
    typer.echo(
        f"merged {len(models)} models ({method}) into {written} (provenance: {written / 'ledger.jsonl'})"
    )


ModelArg = Annotated[
    str,
    typer.Argument(help="A run directory, a checkpoint, or a Hugging Face model (directory or hub name)."),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="The most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16 where the hardware runs it fast), bf16 or fp32.")
]


def _locate(target: str | Path) -> None:
    from trulyopen.locate import check_model

    check_model(target)


def _check_precision(precision: str) -> None:
    if precision not in ("auto", "bf16", "fp32"):
        raise typer.BadParameter(f"--precision {precision}: choose auto, bf16 or fp32")


def _load_for_inference(target: str, precision: str):
    from trulyopen import api

    _check_precision(precision)
    return api.load_model(target, precision)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="0 keeps every token.")] = 0,
    seed: Annotated[int | None, typer.Option("--seed", help="The same seed gives the same text.")] = None,
    precision: PrecisionOpt = "auto",
):
    """Continue PROMPT with MODEL, printing the text as it is generated."""
    from trulyopen import api

    loaded = _load_for_inference(model, precision)
    api.generate(
        loaded, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )


@app.command()
def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    precision: PrecisionOpt = "auto",
    image: Annotated[
        str | None,
        typer.Option("--image", help="An image (path) shown to a VLM with the first message."),
    ] = None,
):
    """Chat with MODEL in the terminal (through its tokenizer's chat template); an empty line ends it.
    A vision-language model takes images: --image PATH, or a line `/image PATH` before a message."""
    if image is not None and not Path(image).is_file():
        raise typer.BadParameter(f"--image {image}: no such file")
    m, tok, _ = _load_for_inference(model, precision)
    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.serve.terminal import chat as chat_loop
    from trulyopen.vlm.generate import VLM

    if image is not None and not isinstance(m, VLM):
        raise typer.BadParameter(f"--image: {model} is a text model: it reads no images")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=0.95)
    chat_loop(m, tok, params, system, image=image)


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="TRULYOPEN_API_KEY", help="Require this bearer key (default: none)."
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="trulyopen (built in), llama.cpp (a GGUF export, made once), or vllm / sglang with a GPU.",
        ),
    ] = "trulyopen",
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="With --engine llama.cpp: the GGUF type (f32, f16, bf16, q8_0, q4_k_m); default: as "
            "--precision (auto: bf16 where the CPU runs it fast, else f16).",
        ),
    ] = None,
    max_concurrent: Annotated[
        int, typer.Option("--max-concurrent", min=1, help="Requests decoded at once.")
    ] = 32,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests waiting for a slot before 429.")
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="The most tokens a request may ask for.")
    ] = 1024,
    max_prompt_tokens: Annotated[int | None, typer.Option("--max-prompt-tokens")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes")] = 1_000_000,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds per request.")] = 300.0,
    allow_image_urls: Annotated[
        bool,
        typer.Option(
            "--allow-image-urls",
            help="A vision-language model: fetch http(s) image URLs in requests (default: data URLs and "
            "local paths only).",
        ),
    ] = False,
    max_image_bytes: Annotated[
        int, typer.Option("--max-image-bytes", min=1, help="The largest image a request may send.")
    ] = 20 * 1024 * 1024,
    max_len: Annotated[
        int | None,
        typer.Option(
            "--max-len",
            help="Prompt + answer tokens of one request: the key-value cache holds this many per slot "
            "(default: the model's positions, at most 4096).",
        ),
    ] = None,
    precision: PrecisionOpt = "auto",
):
    """Serve MODEL behind an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions,
    streaming), with a chat page at /. SIGTERM lets running requests finish, then stops."""
    if engine not in ("trulyopen", "llama.cpp", "vllm", "sglang"):
        raise typer.BadParameter(f"--engine {engine}: choose trulyopen, llama.cpp, vllm or sglang")
    if quant is not None and engine != "llama.cpp":
        raise typer.BadParameter(f"--quant {quant}: only with --engine llama.cpp")
    if engine in ("vllm", "sglang"):
        from trulyopen.serve.launch import serve_external

        raise typer.Exit(serve_external(engine, model, host, port, api_key))
    _check_precision(precision)
    _locate(model)  # a wrong path is named before torch is even imported
    from trulyopen.serve.app import Limits
    from trulyopen.serve.launch import serve as serve_ours

    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        allow_image_urls=allow_image_urls,
        max_image_bytes=max_image_bytes,
    )
    serve_ours(model, host, port, limits, api_key, precision, max_len, engine, quant)


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="A run directory, or `batch` followed by a run directory.")],
    run_dir: Annotated[Path | None, typer.Argument(help="With `batch`: the run directory.")] = None,
    step: Annotated[
        int | None, typer.Option("--step", help="With `batch`: the training step (1-based).")
    ] = None,
):
    """Summarise a run directory (`inspect RUN_DIR`), or show the documents of one training batch
    (`inspect batch RUN_DIR --step N`)."""
    from trulyopen.inspect_run import show_batch, summarize

    if target == "batch":
        if run_dir is None or step is None:
            raise typer.BadParameter("usage: trulyopen inspect batch RUN_DIR --step N")
        show_batch(run_dir, step)
    else:
        summarize(Path(target))


@app.command()
def release(
    target: Annotated[Path, typer.Argument(help="A run directory (or a recipe file) to release.")],
    set: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = None,
    workers: WorkersOpt = None,
):
    """Release a run: RUN_DIR/release/, a self-contained bundle of the model, checkpoints, data,
    code, logs, evaluation, cards, licences, mof.yml, its audit and SHA256SUMS. Stages before it
    that are not up to date run first."""
    from trulyopen import api

    out = api.release_run(target, set or [], run_dir=run_dir, force=force or [], workers=workers)
    _say_release(out.parent)


def _say_release(run_dir: Path) -> None:
    audit_file = run_dir / "release" / "audit.json"
    if audit_file.exists():
        label = json.loads(audit_file.read_text())["label"]
        typer.echo(f"release: {run_dir / 'release'}  (Model Openness Framework: {label}; {audit_file})")
        typer.echo(
            f"report: {run_dir / 'release' / 'report' / 'report.html'}  (verify: trulyopen verify "
            f"{run_dir / 'release'})"
        )


@app.command()
def audit(
    directory: Annotated[Path, typer.Argument(help="Any directory: a release, a Hugging Face model folder.")],
    output: Annotated[
        Path | None, typer.Option("--json", help="Where to write the audit (default: DIR/audit.json).")
    ] = None,
):
    """Score a directory against the Model Openness Framework: its 17 components, licences and
    classes (III Open Model, II Open Tooling, I Open Science), and the OSI Open Source AI Definition."""
    from trulyopen import api

    result = api.audit(directory, output)
    typer.echo(result.table())
    typer.echo(f"written: {output or directory / 'audit.json'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: RUN_DIR/report).")
    ] = None,
):
    """One self-contained HTML page on a run (loss, learning rate, throughput, gradient norm, data
    funnel, corpus by source, evaluation, openness verdict), with its figures as PNGs beside it."""
    from trulyopen import api

    typer.echo(f"report: {api.report(run_dir, out)}")


@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(help="A release directory (RUN_DIR/release).")],
    replay: Annotated[
        int | None,
        typer.Option("--replay", help="Retrain to this step from the checkpoint before it."),
    ] = None,
    stage: Annotated[
        str,
        typer.Option("--stage", help="The stage --replay retrains: pretrain or finetune."),
    ] = "pretrain",
):
    """Check every hash in SHA256SUMS and the ledger, and that each checkpoint's data fingerprint,
    recipe and code version agree; with --replay STEP, retrain to STEP and compare the weights."""
    from trulyopen import api

    report = api.verify(directory)
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    typer.echo(f"{report.checked} files checked, {len(report.problems)} problems")
    if stage not in ("pretrain", "finetune"):
        raise errors.UserError(f"--stage {stage}: give pretrain or finetune")
    result = api.replay(directory, replay, stage=stage) if replay is not None else None
    if result is not None:
        stretch = f"replay: steps {result['from_step']}..{result['step']}"
        if result["identical"]:
            typer.echo(f"{stretch} reproduce the released weights bit for bit")
        else:
            typer.echo(
                f"{stretch} differ from the release: largest difference {result['max_abs_diff']:.3g} "
                f"in {result['where']}"
            )
        typer.echo(json.dumps({k: result[k] for k in ("recorded", "replayed")}, indent=2))
    if report.problems or (result is not None and not result["identical"]):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- the project's history


@app.command()
def history(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="PROJECT_DIR (default: runs), or: diff RUN_A RUN_B [--project DIR]."),
    ] = None,
    project_dir: Annotated[Path, typer.Option("--project", help="The project folder, for diff.")] = Path(
        "runs"
    ),
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write the history as one HTML page here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
):
    """The project's runs as a tree: what each came from (its recipe diff), why, how it ended and its
    results; `history diff A B` compares two runs' recipes, code versions and results."""
    from dataclasses import asdict

    from trulyopen.history.project import LEDGER, Project
    from trulyopen.history.show import diff, html_page, tree_lines

    args = args or []
    if args and args[0] == "diff":
        if len(args) != 3:
            raise errors.UserError("history diff: give two runs: history diff RUN_A RUN_B [--project DIR]")
        result = diff(Project(project_dir), args[1], args[2])
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        for part in ("recipe", "code", "results"):
            typer.echo(f"{part}: " + ("same" if not result[part] else ""))
            for k, (a, b) in result[part].items():
                typer.echo(f"  {k}: {a!r} -> {b!r}")
        return
    if len(args) > 1:
        raise errors.UserError("history: give one project folder (or: history diff RUN_A RUN_B)")
    project = Project(Path(args[0]) if args else project_dir)
    if not project.path.is_file():
        raise errors.UserError(
            f"{project.path}: no project history here (`trulyopen run` writes {LEDGER} beside its runs)"
        )
    for name in project.notice_deleted():
        typer.echo(f"{name}: its folder is gone; its entry is kept, marked deleted")
    runs = project.runs()
    if html_out is not None:
        from trulyopen.files import write_text

        write_text(html_out, html_page(project))
        typer.echo(f"history: {html_out}")
    if as_json:
        typer.echo(json.dumps({k: asdict(v) for k, v in runs.items()}, indent=2, default=str))
    else:
        for line in tree_lines(runs):
            typer.echo(line)
    for problem in project.problems():
        typer.echo(f"problem: {problem}")


# ----------------------------------------------------------------------------- tracing to the data


@app.command()
def trace(
    target: Annotated[str, typer.Argument(help="A release or a run directory (with a trace index).")],
    text: Annotated[str | None, typer.Argument(help="The text to trace.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Trace this file's text instead.")] = None,
    generate: Annotated[
        str | None,
        typer.Option("--generate", help="Trace the model's own continuation of this prompt (greedy)."),
    ] = None,
    max_tokens: MaxTokensOpt = 128,
    min_len: Annotated[int, typer.Option("--min-len", min=1, help="Shortest span, in tokens.")] = 8,
    keep: Annotated[
        float, typer.Option("--keep", min=0.0, max=1.0, help="Spans kept, as a share of the text's tokens.")
    ] = 0.05,
    docs: Annotated[int, typer.Option("--docs", min=1, help="Documents shown per span.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Find the spans of TEXT (or --file, or the model's answer to --generate) that occur verbatim in
    the training data, OLMoTrace's way, and show the documents they come from."""
    from trulyopen import api
    from trulyopen.trace.spans import find_index

    given = [x is not None for x in (text, file, generate)]
    if sum(given) != 1:
        raise errors.UserError("trace: give one of TEXT, --file FILE or --generate PROMPT")
    find_index(target)  # no index: say so before loading a model
    if file is not None:
        if not file.is_file():
            raise errors.UserError(f"--file {file}: no such file")
        text = file.read_text(encoding="utf-8", errors="replace")
    if generate is not None:
        text = api.generate(target, generate, max_tokens=max_tokens, temperature=0.0, echo=not as_json)
        if not as_json:
            typer.echo()
    result = api.trace(target, text, min_len=min_len, keep=keep, docs_per_span=docs)
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    from trulyopen.trace.show import show

    show(result)


@app.command()
def ngram(
    target: Annotated[str, typer.Argument(help="A release or a run directory (with a trace index).")],
    prefix: Annotated[str, typer.Argument(help="The prefix, as it would appear in the text.")],
    top: Annotated[int, typer.Option("--top", min=1, help="Next tokens shown.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """How often PREFIX occurs in the training data, and which tokens follow it (from the trace index)."""
    from trulyopen import api

    result = api.ngram(target, prefix, top)
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    approx = " (sampled)" if result["approx"] else ""
    typer.echo(f"{result['count']:,} occurrences of {prefix!r} ({result['tokens']} tokens){approx}")
    for n in result["next"]:
        typer.echo(f"  {n['prob']:8.2%}  {n['count']:>8,}  {n['token']!r}")


# ----------------------------------------------------------------------------- the recipe library


@app.command("recipes")
def recipes_(
    name: Annotated[str | None, typer.Argument(help="A recipe: print where it is and its header.")] = None,
):
    """List the library's tested recipes: what each does, the hardware it expects, about how long."""
    import shutil

    from trulyopen import recipe_library as library

    if name is None:
        typer.echo(library.listing(width=min(shutil.get_terminal_size().columns, 110)))
        return
    path = library.find(name)
    typer.echo(f"{path}\n\n{library.parse_header(path.read_text(encoding='utf-8')).text}")


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="The new recipe: NAME.yaml here, or a path (NAME or x.yaml).")],
    source: Annotated[
        str, typer.Option("--from", help="A recipe from `trulyopen recipes` (e.g. lora), or a recipe file.")
    ],
):
    """Start a recipe of your own from one of the library's: a copy named NAME to edit (never over a file)."""
    from trulyopen import recipe_library as library

    target, origin = library.copy(source, name)
    typer.echo(f"wrote {target} (a copy of {origin})")
    if origin.name.endswith(f"{library.SPACE_SUFFIX}.yaml"):
        typer.echo(f"use it: trulyopen tune RECIPE --space {target} --trials N")
        return
    for field, path in library.missing_paths(target):
        typer.echo(f"to provide: {field}: {path} is not there yet")
    typer.echo(f"edit it, then: trulyopen run {target}")


LAUNCH_ACTIONS = ("status", "logs", "down")


@app.command()
def launch(
    target: Annotated[
        str, typer.Argument(help="A recipe, or status, logs or down followed by a launch name.")
    ],
    launch_name: Annotated[str | None, typer.Argument(help="The launch's name (status, logs, down).")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Name of the launch (default: the recipe's name).")
    ] = None,
    on: Annotated[
        str | None, typer.Option("--on", help="aws, gcp, azure, lambda, runpod, kubernetes or slurm.")
    ] = None,
    gpus: Annotated[
        str | None, typer.Option("--gpus", help="Accelerators per node: NAME:COUNT, e.g. H100:8.")
    ] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", help="Nodes (torchrun across them).")] = None,
    procs_per_node: Annotated[
        int | None, typer.Option("--procs-per-node", help="Processes per node (default: one per GPU).")
    ] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--no-spot", help="Spot instances.")] = None,
    region: Annotated[str | None, typer.Option("--region", help="Cloud region.")] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Run directory storage: s3://bucket/path or volume:NAME.")
    ] = None,
    verb: Annotated[
        str | None, typer.Option("--verb", help="run (default), data, pretrain, finetune, eval, release.")
    ] = None,
    wheel: Annotated[bool, typer.Option("--wheel", help="Ship a wheel built from the working tree.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write what would be sent; launch nothing.")
    ] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Do not follow the logs.")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="logs: keep printing until the job ends.")] = False,
    set: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="slurm: the run directory (default runs/<recipe name>).")
    ] = None,
):
    """Run a recipe on a cloud or Kubernetes (SkyPilot) or under Slurm; `launch status|logs|down NAME`."""
    from trulyopen import launch as launcher

    if target in LAUNCH_ACTIONS and not Path(target).is_file():
        if launch_name is None:
            raise errors.UserError(
                f"launch {target}: give the launch's name, e.g. `trulyopen launch {target} NAME`"
            )
        if target == "status":
            typer.echo(launcher.status(launch_name))
        elif target == "logs":
            state = launcher.logs(launch_name, follow=follow)
            if state:
                typer.echo(f"{launch_name}: {state}")
        else:
            launcher.down(launch_name)
            typer.echo(f"{launch_name}: taken down")
        return
    given = dict(
        target=on,
        gpus=gpus,
        nodes=nodes,
        procs_per_node=procs_per_node,
        spot=spot,
        region=region,
        store=store,
        verb=verb,
    )
    rec = launcher.launch(Path(target), set or [], given, name, wheel, dry_run, detach, run_dir)
    if rec.get("dry_run"):
        typer.echo(f"dry run: {rec['file']} (nothing launched)")
        if rec.get("command") is None and rec["on"] != "slurm":
            typer.echo(
                f"launch it with: trulyopen launch {target} --on {rec['on']} ...  (same flags, no --dry-run)"
            )
        return
    if rec["on"] == "slurm":
        state = rec.get("state", "submitted")
        log = rec["log"].replace("%j", rec["job_id"])
        typer.echo(f"{rec['name']}: slurm job {rec['job_id']} {state} (log {log})")
        if state not in ("COMPLETED", "submitted"):
            raise typer.Exit(1)
    else:
        typer.echo(f"{rec['name']}: launched on {rec['on']}; `trulyopen launch status {rec['name']}`")


def main() -> None:
    """`trulyopen`: the app, with usage errors (an unknown flag, a missing argument) in one line too."""
    from typer.exceptions import TyperException

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no loading bars around a one-line error
    signal.signal(signal.SIGINT, _on_ctrl_c)
    sys.unraisablehook = _on_unraisable
    try:
        code = app(args=sys.argv[1:] or ["--help"], prog_name="trulyopen", standalone_mode=False)
    except typer.Abort:  # click's name for Ctrl-C outside a verb
        code = _interrupted()
    except TyperException as e:  # a flag or argument the command does not take
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx else "trulyopen"
        code = _fail(f"{e.format_message().rstrip('.')}; see `{command} --help`")
    code = code if isinstance(code, int) else 0
    if code == 130:
        _exit_now(code)
    sys.exit(code)


_ctrl_c_seen = False


def _on_ctrl_c(signum: int, frame) -> None:
    """Python's own SIGINT handler (KeyboardInterrupt), remembering that it ran."""
    global _ctrl_c_seen
    _ctrl_c_seen = True
    signal.default_int_handler(signum, frame)


def _on_unraisable(info) -> None:
    """A Ctrl-C that lands in a finalizer (an object's __del__, run whenever the collector runs)
    is printed as "Exception ignored in ... Traceback" and lost: the run would go on. Raise it
    again a moment later, from another thread, so that the main thread raises it once the
    finalizer returned (raised here, it would be lost the same way; if it lands in a finalizer
    again, this comes round again). Anything else is Python's to report."""
    if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
        import _thread  # threading.Thread.start waits for the thread: the signal could land in that wait

        _thread.start_new_thread(_ctrl_c_again, ())
        return
    sys.__unraisablehook__(info)


def _ctrl_c_again() -> None:
    time.sleep(0.01)
    signal.raise_signal(signal.SIGINT)


def _exit_now(code: int) -> None:
    """Exit after Ctrl-C without tearing the interpreter down. A native library's thread caught
    mid-work (tokenizers, fastokens, torch) can abort the process as the interpreter frees the objects
    under it ("Fatal Python error: PyThreadState_Get ... finalizing", SIGABRT). Everything finished
    is on disk by now (files are written whole, then renamed); the exit handlers still run (Ray's
    shutdown, multiprocessing's cleanup), and the streams are flushed."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    typer.echo(f"error: {line}", err=True)
    return 2


def _interrupted() -> int:
    # a second Ctrl-C (or one still pending in a library's thread) must not cut the exit short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:]
    if args and args[0] in RESUMABLE:
        rerun = f"trulyopen {shlex.join(args)}"
        typer.echo(f"interrupted; finished work is kept: rerun `{rerun}` to resume", err=True)
    else:
        typer.echo("interrupted", err=True)
    return 130


# the verbs that run pipeline stages: interrupted, they resume where they stopped
RESUMABLE = {"run", "data", "tokenizer", "pretrain", "synth", "finetune", "eval", "release", "tune"}


def _crash(e: BaseException) -> int:
    report = errors.write_crash_report(e)
    typer.echo(
        f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:200]}); this is a bug in "
        f"trulyopen: the crash report is {report} (please attach it to an issue)",
        err=True,
    )
    return 1
