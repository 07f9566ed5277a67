"""Log-likelihood of continuations, scoring a shared context once.

A multiple-choice item asks for log p(choice | context) for every choice. Scoring each (context,
choice) pair separately repeats the context's forward pass once per choice; here the context and
all its choices go into one row as a small tree:

    tokens     c c c c | a a | b b b | d          one row: the context, then each choice
    branch     0 0 0 0 | 1 1 | 2 2 2 | 3          a choice attends to the context and to itself
    positions  0 1 2 3 | 4 5 | 4 5 6 | 4          each choice continues at the context's end

so a 4-choice item costs one context plus its choices instead of four contexts. Several items
share a row when they fit (a segment id keeps them apart), and rows are batched. Tokenisation
follows lm-eval (`_encode_pair`): trailing spaces of the context move to the continuation, the
continuation's tokens are those of context+continuation after the context's, and an empty
context becomes the end-of-text token, so the numbers are comparable with the harness's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Request:
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every token is the model's argmax
    tokens: int


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx) :]
    return (ctx or [tok.eos_token_id]), cont


def request(tok, context: str, continuations: list[str]) -> Request:
    pairs = [encode_pair(tok, context, c) for c in continuations]
    return Request(pairs[0][0], [cont for _, cont in pairs])


def _fit(req: Request, max_len: int) -> list[Request]:
    """A request whose tree does not fit a row becomes one request per continuation, with the
    context cut from the left (as lm-eval does)."""
    if len(req.context) + sum(len(c) for c in req.continuations) <= max_len:
        return [req]
    return [Request(req.context[-(max_len - len(c)) :], [c]) for c in req.continuations]


@torch.no_grad()
def score(
    model: torch.nn.Module, requests: list[Request], max_len: int, batch_rows: int = 8
) -> list[list[Score]]:
    """Scores[i][j]: continuation j of request i."""
    device = next(model.parameters()).device
    # flatten to trees that fit, remembering where each continuation's score goes
    trees: list[tuple[Request, list[tuple[int, int]]]] = []
    for i, req in enumerate(requests):
        parts = _fit(req, max_len)
        if len(parts) == 1:
            trees.append((parts[0], [(i, j) for j in range(len(req.continuations))]))
        else:
            trees += [(p, [(i, j)]) for j, p in enumerate(parts)]
    # pack trees into rows (longest first keeps rows full), then rows into batches
    order = sorted(
        range(len(trees)),
        key=lambda t: -(len(trees[t][0].context) + sum(map(len, trees[t][0].continuations))),
    )
    rows: list[list[int]] = []
    used: list[int] = []
    for t in order:
        n = len(trees[t][0].context) + sum(map(len, trees[t][0].continuations))
        for r in range(len(rows)):
            if used[r] + n <= max_len:
                rows[r].append(t)
                used[r] += n
                break
        else:
            rows.append([t])
            used.append(n)
    out: list[list[Score | None]] = [[None] * len(r.continuations) for r in requests]
    for b in range(0, len(rows), batch_rows):
        batch = rows[b : b + batch_rows]
        T = max(used[b : b + batch_rows])
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        pos = torch.zeros((len(batch), T), dtype=torch.long)
        seg = torch.full((len(batch), T), -1, dtype=torch.long)
        branch = torch.zeros((len(batch), T), dtype=torch.long)
        targets = []  # (row, predicting positions, target ids, where the score goes)
        for r, row in enumerate(batch):
            at = 0
            for s, t in enumerate(row):
                req, dest = trees[t]
                L = len(req.context)
                ids[r, at : at + L] = torch.tensor(req.context)
                pos[r, at : at + L] = torch.arange(L)
                seg[r, at : at + L] = s
                ctx_last, at = at + L - 1, at + L
                for j, cont in enumerate(req.continuations):
                    n = len(cont)
                    ids[r, at : at + n] = torch.tensor(cont)
                    pos[r, at : at + n] = torch.arange(L, L + n)
                    seg[r, at : at + n] = s
                    branch[r, at : at + n] = j + 1
                    predicting = [ctx_last] + list(range(at, at + n - 1))
                    targets.append((r, predicting, cont, dest[j]))
                    at += n
        idx = torch.arange(T)
        causal = idx[None, :, None] >= idx[None, None, :]
        same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        same_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (causal & same_seg & same_branch) | torch.eye(T, dtype=torch.bool)[None]  # padding sees itself
        logits = model(
            input_ids=ids.to(device), attention_mask=mask[:, None].to(device), position_ids=pos.to(device)
        ).logits
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        for r, predicting, cont, (i, j) in targets:
            rows_lp = logp[r, predicting]
            target = torch.tensor(cont)
            out[i][j] = Score(
                float(rows_lp.gather(1, target[:, None]).sum()),
                bool((rows_lp.argmax(dim=-1) == target).all()),
                len(cont),
            )
    return out  # type: ignore[return-value]
