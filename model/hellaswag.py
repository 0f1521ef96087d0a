"""HellaSwag scored as lm-evaluation-harness scores it: the summed log-likelihood of " " + ending after the context,
acc by the largest sum, acc_norm by the largest sum per character of the ending. Items go through the model a few at
a time, right-padded to the longest of the batch: a little wasted compute on padding, no per-length bucketing."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from model.evaluate import autocast


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, the whole is encoded once,
    and the continuation's tokens are those after the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    return ctx, whole[len(ctx):]


def requests(tok, item, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(model input, continuation tokens it predicts) per ending: context + continuation cut from the left to
    block_size + 1 tokens, the last dropped (it is only a target), as the harness feeds a causal model. An ending
    longer than the block has its last block_size tokens scored, a case the harness fails on."""
    out = []
    for ending in item.endings:
        ctx, cont = encode_pair(tok, item.context, " " + ending)
        if not cont:
            raise ValueError(f"ending {ending!r}: encodes to no tokens after its context")
        inp = (ctx + cont)[-(block_size + 1):][:-1]
        out.append((inp, cont[-len(inp):]))
    return out


@torch.no_grad()
def loglikelihoods(model, reqs: list[tuple[list[int], list[int]]], device: torch.device) -> list[float]:
    """Summed log-probability of each request's continuation tokens (float32 log-softmax, float64 sums). Only the
    continuation rows go through the output layer: it is most of the model's cost, and the context rows are unused."""
    width = max(len(inp) for inp, _ in reqs)
    x = torch.zeros((len(reqs), width), dtype=torch.long)
    for r, (inp, _) in enumerate(reqs):
        x[r, :len(inp)] = torch.tensor(inp)
    with autocast(device):
        h = model.hidden(x.to(device))
        rows = torch.cat([h[r, len(inp) - len(cont):len(inp)] for r, (inp, cont) in enumerate(reqs)])
        logits = model.logits(rows)
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor([t for _, cont in reqs for t in cont], device=device)
    picked = logp.gather(1, target[:, None])[:, 0].double()
    return [float(part.sum()) for part in picked.split([len(cont) for _, cont in reqs])]


def stderr(p: float, n: int) -> float | None:
    """The harness's standard error of a mean of 0/1 scores: sample std / sqrt(n) = sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def score(model, tok, items: list, batch_items: int = 8) -> dict:
    """acc, acc_norm, their standard errors and n over `items` (tasks.hellaswag.Item); every ending of an item
    goes through the model in the same batch."""
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    acc, acc_norm = [], []
    try:
        for i in range(0, len(items), batch_items):
            group = items[i:i + batch_items]
            reqs = [requests(tok, it, block) for it in group]
            lls = loglikelihoods(model, [r for rs in reqs for r in rs], device)
            k = 0
            for it in group:
                ll = np.array(lls[k:k + len(it.endings)])
                k += len(it.endings)
                # an ending that preprocessing emptied ("[header]" alone) counts one character, not a division by 0
                chars = np.array([float(max(len(e), 1)) for e in it.endings])
                acc.append(float(np.argmax(ll) == it.label))
                acc_norm.append(float(np.argmax(ll / chars) == it.label))
    finally:
        model.train(was_training)
    n = len(acc)
    a, an = float(np.mean(acc)), float(np.mean(acc_norm))
    return {"acc": a, "acc_stderr": stderr(a, n), "acc_norm": an, "acc_norm_stderr": stderr(an, n), "n": n,
            "seconds": time.perf_counter() - t0}


def run_hellaswag(loaded, data: Path, limit: int | None = None, batch_items: int = 8) -> dict:
    """HellaSwag on the checkpoint in `loaded` (model.generate.Loaded): the whole file is read and checked, its
    first `limit` items scored; the data's identity is the file's sha256 and item count."""
    from model.evaluate import result
    from storage.shards import file_sha256
    from tasks.hellaswag import read_items

    items = read_items(data)
    r = score(loaded.model, loaded.tokenizer, items[:limit], batch_items)
    return result(loaded, "hellaswag", file_sha256(data), len(items), r["seconds"],
                  [{"metric": "acc", "value": r["acc"], "stderr": r["acc_stderr"], "n": r["n"]},
                   {"metric": "acc_norm", "value": r["acc_norm"], "stderr": r["acc_norm_stderr"], "n": r["n"]}],
                  data=str(data))
