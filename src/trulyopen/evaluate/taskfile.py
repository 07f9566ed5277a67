"""Evaluation task files (JSONL, one item a line) and task suites (YAML lists of tasks).

A task file holds items of one kind; `id` is optional (default: the line number) and `meta` (any
JSON object: provenance, a reference solution) is carried along but never scored:

    multiple_choice  {"id", "context", "choices": [...], "answer": <index>, "question"?, "images"?}
    generation       {"id", "prompt", "verifier": {<a spec of trulyopen.rewards.verifiers>}, "images"?}
    code             {"id", "prompt", "tests"}    prompt + completion + tests run in the sandbox
    text             {"id", "text"}               scored in bits per byte
    tool_call        {"id", "messages", "tools", "answer": {"name", "arguments"}}   messages and tools
                                                  in OpenAI's format: is the right function called,
                                                  with arguments its schema accepts?
    judge            {"id", "prompt", "reference"?, "baseline"?}   the model answers the prompt and
                                                  a judge model scores the answer (the task's
                                                  `judge` settings: rubric, reference or pairwise)

Files are checked strictly, every line before any model runs: invalid JSON, a missing, mistyped or
unknown field, empty choices, an answer out of range, a repeated id or a bad verifier spec is a
TaskError naming `<file>:<line>`, so a typo ("choises") cannot silently become a wrong score. The
sha256 of a task file is `trulyopen.files.sha256_file`; results record it.

A suite lists tasks with their settings; relative task paths are resolved against the suite file,
and every task file is loaded once while the suite is read, so a broken file fails before a model
is loaded. That includes what a judge task's mode needs of its items: a reference for `reference`,
a baseline answer for `pairwise` (unless a baseline model gives them).

Multiple-choice and generation items may carry `images`: a list of image files (relative to the task
file) or data URLs, shown to a vision-language model before the item's text. Each is loaded and
checked (trulyopen.vlm.images) when the file is read, so a missing or broken image is named by line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trulyopen.errors import UserError
from trulyopen.files import atomic_open
from trulyopen.judge import DEFAULT_RUBRIC, JudgeError, check_template
from trulyopen.recipe import HostedModelConfig
from trulyopen.rewards.verifiers import VerifierError, parse_verifier

KINDS = ("multiple_choice", "generation", "code", "text", "tool_call", "judge")
TaskKind = Literal["multiple_choice", "generation", "code", "text", "tool_call", "judge"]

# per kind: the required fields and the optional ones ("id" and "meta" are allowed everywhere)
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "multiple_choice": (("context", "choices", "answer"), ("question", "images")),
    "generation": (("prompt", "verifier"), ("images",)),
    "code": (("prompt", "tests"), ()),
    "text": (("text",), ()),
    "tool_call": (("messages", "tools", "answer"), ()),
    "judge": (("prompt",), ("reference", "baseline")),
}
_COMMON = ("id", "meta")


class TaskError(UserError, ValueError):
    """A task file or suite that cannot be used; the message names the file and the line or field."""


@dataclass
class Instance:
    """One evaluation item; only the fields of its kind are filled."""

    id: str
    where: str  # file:line, for messages
    kind: str  # "multiple_choice" | "generation" | "code" | "text"
    context: str = ""
    choices: list[str] = field(default_factory=list)
    answer: int | None = None
    question: str | None = None
    prompt: str = ""
    verifier: dict | None = None
    tests: str = ""
    text: str = ""
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    call: dict | None = None  # tool_call: the expected {"name", "arguments"}
    reference: str | None = None  # judge: a reference answer
    baseline: str | None = None  # judge: the answer a pairwise judge compares against
    images: list[str] = field(default_factory=list)  # multiple_choice, generation: paths or data URLs
    meta: dict = field(default_factory=dict)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise TaskError(f"unknown task type {kind!r}: expected one of {', '.join(KINDS)}")


def _string(record: dict, name: str, *, empty_ok: bool = False) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise ValueError(f"field {name!r} must not be empty")
    return value


def _images(value: object, base_dir: Path) -> list[str]:
    """An item's images as absolute paths or data URLs, each loaded once to check it is an image."""
    from trulyopen.vlm.images import BadImage, load_image

    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("field 'images' must be a non-empty list of image paths or data URLs")
    out = []
    for i, ref in enumerate(value):
        ref = ref if ref.startswith("data:") or Path(ref).is_absolute() else str(base_dir / ref)
        try:
            load_image(ref)
        except BadImage as e:
            raise ValueError(f"field 'images'[{i}]: {e}") from None
        out.append(ref)
    return out


def _parse_record(record: object, kind: str, lineno: int, where: str) -> Instance:
    """The Instance of one JSON value; ValueError saying what is wrong (the caller adds file:line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    required, optional = _FIELDS[kind]
    unknown = sorted(set(record) - {*required, *optional, *_COMMON})
    if unknown:
        allowed = ", ".join([*required, *optional, *_COMMON])
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for a {kind} item: allowed {allowed}"
        )
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(map(repr, missing))} (required for a {kind} item)")

    raw_id = record.get("id", lineno)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        raise ValueError(f"field 'id' must be a non-empty string or an integer, got {raw_id!r}")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"field 'meta' must be a JSON object, got {type(meta).__name__}")
    inst = Instance(id=str(raw_id), where=where, kind=kind, meta=meta)
    if "images" in record:
        inst.images = _images(record["images"], Path(where.rsplit(":", 1)[0]).parent)

    if kind == "multiple_choice":
        inst.context = _string(record, "context", empty_ok=True)
        choices = record["choices"]
        if not isinstance(choices, list):
            raise ValueError(f"field 'choices' must be a list of strings, got {type(choices).__name__}")
        if len(choices) < 2:
            raise ValueError(f"field 'choices' needs at least 2 choices, got {len(choices)}")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice.strip():
                raise ValueError(f"choice {i} must be a non-empty string, got {choice!r}")
            if choice in choices[:i]:
                raise ValueError(f"choice {i} repeats choice {choices.index(choice)}: {choice!r}")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f"field 'answer' must be the index of the right choice, got {answer!r}")
        if not 0 <= answer < len(choices):
            raise ValueError(f"field 'answer' is {answer}, out of range for {len(choices)} choices")
        if "question" in record:
            inst.question = _string(record, "question")
        if not inst.context.strip() and inst.question is None:
            raise ValueError("field 'context' must not be empty (or give a 'question')")
        inst.choices, inst.answer = list(choices), answer
    elif kind == "generation":
        inst.prompt = _string(record, "prompt")
        try:
            parse_verifier(record["verifier"])
        except VerifierError as e:
            raise ValueError(f"field 'verifier': {e}") from None
        inst.verifier = record["verifier"]
    elif kind == "code":
        inst.prompt = _string(record, "prompt")
        inst.tests = _string(record, "tests")
    elif kind == "tool_call":
        from trulyopen.finetune.records import BadRecord, read_messages, read_tools

        try:
            inst.messages = read_messages(record["messages"], "messages")
            inst.tools = read_tools(record["tools"]) or []
        except BadRecord as e:
            raise ValueError(f"field {e}") from None
        answer = record["answer"]
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise ValueError("field 'answer' must be an object with the function's name and its arguments")
        if not isinstance(answer.get("arguments"), dict):
            raise ValueError("field 'answer.arguments' must be a JSON object")
        if answer["name"] not in [t["function"]["name"] for t in inst.tools]:
            raise ValueError(f"field 'answer.name': {answer['name']!r} is none of the tools")
        inst.call = {"name": answer["name"], "arguments": answer["arguments"]}
    elif kind == "judge":
        inst.prompt = _string(record, "prompt")
        for name in ("reference", "baseline"):
            if name in record:
                setattr(inst, name, _string(record, name))
    else:
        inst.text = _string(record, "text")
    return inst


def load_instances(path: Path, kind: str) -> list[Instance]:
    """Every item of a task file of the given kind, in file order; TaskError at the first bad line."""
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    instances: list[Instance] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        try:
            inst = _parse_record(record, kind, lineno, where)
        except ValueError as e:
            raise TaskError(f"{where}: {e}") from None
        if inst.id in first_line:
            raise TaskError(f"{where}: duplicate id {inst.id!r} (first on line {first_line[inst.id]})")
        first_line[inst.id] = lineno
        instances.append(inst)
    if not instances:
        raise TaskError(f"{path}: no items")
    return instances


def instance_text(inst: Instance) -> str:
    """All the text of an item a model could have seen in training: what contamination checks look at."""
    parts = [inst.context, inst.question or "", *inst.choices, inst.prompt, inst.tests, inst.text]
    parts += [inst.reference or "", inst.baseline or ""]
    parts += [m["content"] for m in inst.messages]
    if inst.call is not None:  # the expected call: the answer a trained-on item would give away
        parts.append(json.dumps(inst.call, ensure_ascii=False))
    if inst.verifier is not None:  # the expected answer, or the tests that check it
        parts += [str(inst.verifier.get(name, "")) for name in ("answer", "tests")]
    return "\n".join(p for p in parts if p)


def instance_record(inst: Instance) -> dict:
    """The JSON object of an item, as a task file holds it."""
    record: dict = {"id": inst.id}
    if inst.kind == "multiple_choice":
        record |= {"context": inst.context, "choices": inst.choices, "answer": inst.answer}
        if inst.question is not None:
            record["question"] = inst.question
    elif inst.kind == "generation":
        record |= {"prompt": inst.prompt, "verifier": inst.verifier}
    elif inst.kind == "code":
        record |= {"prompt": inst.prompt, "tests": inst.tests}
    elif inst.kind == "tool_call":
        record |= {"messages": inst.messages, "tools": inst.tools, "answer": inst.call}
    elif inst.kind == "judge":
        record["prompt"] = inst.prompt
        record |= {
            k: v for k, v in (("reference", inst.reference), ("baseline", inst.baseline)) if v is not None
        }
    else:
        record["text"] = inst.text
    if inst.images:
        record["images"] = inst.images
    if inst.meta:
        record["meta"] = inst.meta
    return record


def write_instances(path: Path, records: Iterable[dict | Instance]) -> int:
    """Write a task file atomically, one JSON object a line; returns the number of items."""
    count = 0
    with atomic_open(path) as f:
        for record in records:
            obj = instance_record(record) if isinstance(record, Instance) else record
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            count += 1
    return count


# ----------------------------------------------------------------------------- suites

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # task names become file names of the results


class JudgeSpec(HostedModelConfig):
    """How a judge task is judged: by which hosted model (trulyopen.hosted), and how."""

    mode: Literal["rubric", "reference", "pairwise"] = Field(
        description="rubric: score each answer 1..scale against the rubric; reference: is the answer "
        "correct given the item's reference (yes/no, or 1..scale with a scale); pairwise: the answer "
        "against a baseline answer, asked in both orders (a win only when both agree)."
    )
    rubric: str = Field(default=DEFAULT_RUBRIC, description="rubric: what a good answer is, in a phrase.")
    scale: int | None = Field(
        default=None,
        ge=2,
        le=100,
        description="Scores run from 1 to scale: rubric (default 10), reference (default: a yes/no verdict).",
    )
    baseline_model: str | None = Field(
        default=None,
        description="pairwise: a second model (a run directory, checkpoint or Hugging Face model) whose "
        "answers to the same prompts are the baselines, instead of the items' `baseline`.",
    )
    system: str | None = Field(default=None, description="The judge's system text instead of the default.")
    prompt: str | None = Field(
        default=None,
        description="The judge's prompt template instead of the default (see trulyopen/judge/prompts.py "
        "for its fields, e.g. {question} and {answer}; a literal brace written twice).",
    )

    @property
    def prompt_kind(self) -> str:
        """Which of the judge library's prompts this mode fills."""
        return "reference_scored" if self.mode == "reference" and self.scale else self.mode

    @model_validator(mode="after")
    def _judge_settings(self) -> JudgeSpec:
        if self.baseline_model is not None and self.mode != "pairwise":
            raise ValueError("'baseline_model' applies to mode pairwise only")
        if self.scale is not None and self.mode == "pairwise":
            raise ValueError("'scale' applies to modes rubric and reference, not pairwise")
        if self.prompt is not None:
            try:
                check_template(self.prompt, self.prompt_kind)
            except JudgeError as e:
                raise ValueError(f"'prompt': {e}") from None
        return self


class TaskSpec(BaseModel):
    """One task of a suite: which file, what kind, and how to run it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Unique name of the task in the suite; letters, digits, '_', '.', '-' "
        "(it names the per-item results file)."
    )
    path: Path = Field(
        description="The task file (JSONL); relative paths are resolved against the suite file."
    )
    type: TaskKind = Field(
        description="Kind of items: multiple_choice, generation, code, text, tool_call or judge."
    )
    few_shot: int = Field(default=0, ge=0, description="Examples from the same file put before each item.")
    seed: int = Field(default=1234, description="Seed of the few-shot choice and of sampling.")
    normalization: Literal["token", "char", "none"] = Field(
        default="char",
        description="Multiple choice, cloze form: the log-probability of a choice divided by its "
        "tokens, its characters, or not at all.",
    )
    forms: list[Literal["cloze", "lettered"]] = Field(
        default_factory=lambda: ["cloze", "lettered"],
        min_length=1,
        description="Multiple choice: score the choices as continuations (cloze), as letters after a "
        "lettered list (lettered), or both.",
    )
    max_new_tokens: int = Field(
        default=128, ge=1, description="Generation, code, tool_call and judge: most tokens generated."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, description="Generation, code and judge: sampling temperature (0: greedy)."
    )
    samples: int = Field(default=1, ge=1, description="Code: completions per item, for pass@k.")
    k: list[int] = Field(
        default_factory=lambda: [1], min_length=1, description="Code: the k of each pass@k reported."
    )
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first this many items.")
    judge: JudgeSpec | None = Field(
        default=None, description="Judge tasks: the judge model (provider, model, key...) and its mode."
    )

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"name {name!r} must be letters, digits, '_', '.' or '-'")
        return name

    @field_validator("forms", "k")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError("repeats a value")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if any(k < 1 for k in self.k):
            raise ValueError(f"field 'k': every k must be at least 1, got {self.k}")
        if max(self.k) > self.samples:
            raise ValueError(
                f"field 'k': pass@{max(self.k)} needs samples >= {max(self.k)}, got {self.samples}"
            )
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("field 'temperature': samples > 1 needs a temperature above 0 (greedy repeats)")
        if (self.type == "judge") != (self.judge is not None):
            need = "required for type judge" if self.judge is None else "applies to type judge only"
            raise ValueError(f"field 'judge': {need}")
        return self


def check_judge_items(spec: TaskSpec, instances: list[Instance]) -> None:
    """TaskError at the first item that lacks what the task's judge mode needs."""
    j = spec.judge
    if j is None or j.mode == "rubric" or (j.mode == "pairwise" and j.baseline_model):
        return
    need = "reference" if j.mode == "reference" else "baseline"
    how = "" if need == "reference" else " (or set judge.baseline_model)"
    for inst in instances:
        if getattr(inst, need) is None:
            raise TaskError(f"{inst.where}: missing field '{need}': judge mode {j.mode} needs it{how}")


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    where = f"field '{loc}': " if loc else ""
    if error["type"] == "extra_forbidden":
        fields = JudgeSpec.model_fields if error["loc"][0] == "judge" else TaskSpec.model_fields
        return f"{where}unknown key (allowed: {', '.join(fields)})"
    if error["type"] == "missing":
        return f"{where}required but missing"
    msg = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    return f"{where}{msg}" if isinstance(got, dict | list) else f"{where}{msg} (got {got!r})"


def load_suite(path: Path) -> list[TaskSpec]:
    """The tasks of a suite file, paths resolved and task files checked; TaskError naming file and task."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task suite not found; check the path given to --tasks or eval.suite")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(tree, list) or not tree:
        raise TaskError(f"{path}: expected a non-empty YAML list of tasks, got {type(tree).__name__}")
    specs: list[TaskSpec] = []
    names: dict[str, int] = {}
    for index, item in enumerate(tree):
        label = f"task {index}" + (
            f" ({item['name']!r})" if isinstance(item, dict) and "name" in item else ""
        )
        if not isinstance(item, dict):
            raise TaskError(f"{path}: {label}: expected a mapping of fields, got {type(item).__name__}")
        try:
            spec = TaskSpec.model_validate(item)
        except ValidationError as e:
            raise TaskError(f"{path}: {label}: " + "; ".join(_describe(err) for err in e.errors())) from None
        if spec.name in names:
            raise TaskError(f"{path}: {label}: field 'name': repeats the name of task {names[spec.name]}")
        names[spec.name] = index
        if not spec.path.is_absolute():
            spec.path = (path.resolve().parent / spec.path).resolve()
        if not spec.path.is_file():
            raise TaskError(f"{path}: {label}: field 'path': task file not found: {spec.path}")
        check_judge_items(spec, load_instances(spec.path, spec.type))  # fail now, not after the model loads
        specs.append(spec)
    return specs
