"""Our models in EleutherAI's lm-evaluation-harness: `trulyopen eval MODEL --lm-eval TASKS`.

The adapter answers the harness's three requests with our own code: log-likelihoods through the
shared-context scorer (loglik.py: requests with the same context are scored as one tree),
rolling log-likelihoods for perplexity tasks, and generation through the inference engine with the task's
stop strings. So any harness task runs on any trulyopen checkpoint, with our batching.
"""

from __future__ import annotations

import json
from pathlib import Path

from trulyopen.evaluate import models
from trulyopen.evaluate.loglik import Request, request, score
from trulyopen.files import write_json
from trulyopen.infer.engine import Engine
from trulyopen.infer.engine import Request as GenerationRequest
from trulyopen.infer.sampling import SamplingParams


def _adapter_class():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("trulyopen")
    class TrulyopenLM(LM):
        """`--model trulyopen --model_args pretrained=PATH` in lm-eval's own command line too."""

        def __init__(self, pretrained: str | None = None, em: models.EvalModel | None = None, **kwargs):
            super().__init__()
            self.em = em if em is not None else models.load(pretrained)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            tok = self.em.tokenizer
            by_context: dict[str, list[int]] = {}
            for n, r in enumerate(requests):
                by_context.setdefault(r.args[0], []).append(n)
            contexts = list(by_context)
            reqs = [request(tok, c, [requests[n].args[1] for n in by_context[c]]) for c in contexts]
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            for c, scores in zip(contexts, score(self.em.model, reqs, self.em.max_len), strict=True):
                for n, s in zip(by_context[c], scores, strict=True):
                    out[n] = (s.logprob, s.greedy)
            return out  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests) -> list[float]:
            tok, L = self.em.tokenizer, self.em.max_len
            chunk = max(1, L // 2)
            reqs, owner = [], []
            for n, r in enumerate(requests):
                ids = tok(r.args[0], add_special_tokens=False)["input_ids"]
                full = [tok.eos_token_id, *ids]
                for s in range(0, len(ids), chunk):
                    piece = ids[s : s + chunk]
                    reqs.append(Request(full[: s + 1][-(L - len(piece)) :], [piece]))
                    owner.append(n)
            totals = [0.0] * len(requests)
            for n, sc in zip(owner, score(self.em.model, reqs, L), strict=True):
                totals[n] += sc[0].logprob
            return totals

        def generate_until(self, requests) -> list[str]:
            """All requests at once through the engine (continuous batching), each with its own
            stop strings and length."""
            tok = self.em.tokenizer
            engine = Engine(self.em.model, tok.decode, slots=32, max_len=self.em.max_len)
            reqs, untils = [], []
            for r in requests:
                context, kw = r.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                params = SamplingParams(
                    max_new_tokens=int(kw.get("max_gen_toks", 256)),
                    temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                    stop_ids=(tok.eos_token_id,),
                    stop_strings=tuple(until),
                    seed=len(reqs),
                )
                ids = tok(context, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
                ids = ids[
                    -max(self.em.max_len - params.max_new_tokens - 1, 1) :
                ]  # cut from the left, as lm-eval
                reqs.append(engine.submit(GenerationRequest(ids, params)))
                untils.append(until)
            while engine.step():
                pass
            out = []
            for req, until in zip(reqs, untils, strict=True):
                text = tok.decode([t for t in req.output if t != tok.eos_token_id])
                cuts = [text.find(u) for u in until if u in text]
                out.append(text[: min(cuts)] if cuts else text)
            return out

    return TrulyopenLM


def run_lm_eval(em: models.EvalModel, tasks: list[str], out: Path, include_path: Path | None = None) -> dict:
    """Run lm-eval tasks on `em` through the adapter; write and print the harness's results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    results = simple_evaluate(
        model=_adapter_class()(em=em), tasks=tasks, task_manager=manager, log_samples=True
    )
    summary = {"model": em.name, "tasks": tasks, "results": results["results"]}
    write_json(out / "results.json", summary)
    for task, samples in results.get("samples", {}).items():
        lines = [json.dumps(s, default=str) for s in samples]
        (out / f"{task}.samples.jsonl").write_text("\n".join(lines) + "\n")
    for task, metrics in results["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        print(f"lm-eval: {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return summary
