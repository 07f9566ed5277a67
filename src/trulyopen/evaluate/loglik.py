"""Log-likelihood of continuations, scoring a shared context once.

A multiple-choice item asks for log p(choice | context) for every choice. Scoring each (context,
choice) pair separately repeats the context's forward pass once per choice; here the context and
all its choices go into one row as a small tree:

    tokens     c c c c | a a | b b b | d          one row: the context, then each choice
    branch     0 0 0 0 | 1 1 | 2 2 2 | 3          a choice attends to the context and to itself
    positions  0 1 2 3 | 4 5 | 4 5 6 | 4          each choice continues at the context's end

so a 4-choice item costs one context plus its choices instead of four contexts. (A choice's last
token predicts nothing, so it is not fed: in the row above, `a`'s second token, `b`'s third and
`d` are only targets.) Logits are taken only where a scored token is predicted. Several items
share a row when they fit (a segment id keeps them apart), and rows are batched. Tokenisation
follows lm-eval (`_encode_pair`): trailing spaces of the context move to the continuation, the
continuation's tokens are those of context+continuation after the context's, an empty context
becomes BOS (end-of-text without one), and a long context is cut from the left as the harness cuts
it, so the numbers are comparable with the harness's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trulyopen.model.logits import logits_at


@dataclass
class Request:
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every token is the model's argmax
    tokens: int


def _prefix_token(tok) -> int:
    """What an empty context becomes: BOS where the tokenizer has one, else end-of-text (lm-eval's
    `prefix_token_id`)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _split_spaces(context: str, continuation: str) -> tuple[str, str]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    req = request(tok, context, [continuation])
    return req.context, req.continuations[0]


def request(tok, context: str, continuations: list[str]) -> Request:
    """The context is tokenised once; each continuation's tokens are those of context+continuation
    after the context's (so a merge across the boundary is charged to the continuation)."""
    stripped, _ = _split_spaces(context, "")
    ctx = tok(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    conts = []
    for c in continuations:
        _, moved = _split_spaces(context, c)
        whole = tok(stripped + moved, add_special_tokens=False)["input_ids"]
        conts.append(whole[len(ctx) :])
    return Request(ctx or [_prefix_token(tok)], conts)


def _size(req: Request) -> int:
    """Tokens a request's tree takes in a row: a continuation's last token predicts nothing, so it
    is never fed."""
    return len(req.context) + sum(max(len(c) - 1, 0) for c in req.continuations)


def _fit(req: Request, max_len: int) -> list[Request]:
    """A request whose tree does not fit a row becomes one request per continuation, with the
    context cut from the left to the last max_len + 1 - len(continuation) tokens, as lm-eval does."""
    if _size(req) <= max_len:
        return [req]
    for c in req.continuations:
        if len(c) > max_len:
            raise ValueError(f"a continuation of {len(c)} tokens does not fit the model's {max_len}")
    return [Request(req.context[-(max_len + 1 - len(c)) :], [c]) for c in req.continuations]


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
    # pack trees into rows (longest first, first fit keeps rows full), then rows into batches
    order = sorted(range(len(trees)), key=lambda t: -_size(trees[t][0]))
    rows: list[list[int]] = []
    used: list[int] = []
    for t in order:
        n = _size(trees[t][0])
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
                    n = max(len(cont) - 1, 0)  # fed tokens: all but the last
                    ids[r, at : at + n] = torch.tensor(cont[:-1], dtype=torch.long)
                    pos[r, at : at + n] = torch.arange(L, L + n)
                    seg[r, at : at + n] = s
                    branch[r, at : at + n] = j + 1
                    targets.append((r, [ctx_last, *range(at, at + n)][: len(cont)], cont, dest[j]))
                    at += n
        idx = torch.arange(T)
        causal = idx[None, :, None] >= idx[None, None, :]
        same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        same_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (causal & same_seg & same_branch) | torch.eye(T, dtype=torch.bool)[None]  # padding sees itself
        # logits at the positions any row predicts from (the union: one index list for the batch)
        keep = sorted({p for _, predicting, _, _ in targets for p in predicting})
        column = {p: k for k, p in enumerate(keep)}
        logits = logits_at(
            model,
            keep,
            input_ids=ids.to(device),
            attention_mask=mask[:, None].to(device),
            position_ids=pos.to(device),
        )
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        for r, predicting, cont, (i, j) in targets:
            rows_lp = logp[r, [column[p] for p in predicting]]
            target = torch.tensor(cont)
            out[i][j] = Score(
                float(rows_lp.gather(1, target[:, None]).sum()),
                bool((rows_lp.argmax(dim=-1) == target).all()),
                len(cont),
            )
    return out  # type: ignore[return-value]
