"""Image-text retrieval (method.md 4.3): recall@K from scores, and a dual encoder scored on a split.

IR (text -> image): the rank of a caption's single ground-truth image.
TR (image -> text): the best (smallest) rank among the image's ground-truth captions.
R@K = percent of queries whose rank is < K.

Tied scores need a rule (small models tie duplicate captions exactly), and the two rules below give
different numbers on the same network (1-2 points of r_mean on ucm-captions):
- "pessimistic": a rank counts the non-ground-truth candidates scoring AT LEAST as high as the ground
  truth, so ties count against the query and a collapsed model (all scores equal) scores 0, not 100.
- "argsort": the authors' BLIP `itm_eval` (LoRS:src/epoch.py): each score row is kept at its top 128
  entries (the rest set to -100, as their `epoch_test`), ordered by `np.argsort(row)[::-1]`, and the
  rank is the ground truth's position in that order. Among tied scores the order is numpy's default
  (unstable) quicksort's, reversed: the same numpy gives exactly their order, which is why queries
  with ties are re-ranked here by that very call.
NaN scores count as -inf under both rules, and a query whose ground truth scores NaN is a miss under
both (a diverged network scores misses; the authors' code would rank NaNs first). Every comparison is made between entries of the same computed score block.

Scores are processed in row blocks (rows = images), so the full (n_images x n_texts) matrix never has
to exist: COCO's 5,000 x 25,010 runs in a few blocks on the scores' own device. TR ranks are exact
per row block. IR ranks need each caption's ground-truth score before comparing, so each block only
keeps the top-`max(KS)` non-ground-truth scores of every caption; R@1/5/10 are exact with that (an IR
rank is reported as min(rank, max(KS))). Under "argsort" only queries whose ground truth ties with a
candidate inside the top max(KS) need their full row, re-read in a second pass for IR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from lors.data.transforms import normalize
from lors.models.dual import DualEncoder

KS = (1, 5, 10)
METRICS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "ir_mean", "tr_mean", "r_mean")
Ties = Literal["pessimistic", "argsort"]
TIE_RULES: tuple[Ties, ...] = ("pessimistic", "argsort")
AUTHORS_TOP_K = 128  # BLIP's k_test: entries kept per score row before argsort
AUTHORS_FILL = -100.0  # the value of every other entry

ScoreRows = Callable[[int, int], torch.Tensor]


def _check_txt2img(txt2img: torch.Tensor, n_images: int, n_texts: int) -> torch.Tensor:
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(txt2img.shape)}, expected ({n_texts},)")
    if n_texts and (txt2img.min() < 0 or txt2img.max() >= n_images):
        raise ValueError("txt2img refers to an image index outside the score matrix")
    return txt2img


def authors_rank(row: torch.Tensor, truths: torch.Tensor) -> int:
    """BLIP's rank of a query: keep the row's top-128 (others -100), then the first position of a
    ground truth in np.argsort(row)[::-1]."""
    values, index = row.topk(min(AUTHORS_TOP_K, len(row)))
    kept = torch.full_like(row, AUTHORS_FILL)
    kept[index] = values
    order = np.argsort(kept.cpu().numpy())[::-1]
    return int(np.isin(order, truths.cpu().numpy()).argmax())


def _ranks(score_rows: ScoreRows, n_images: int, txt2img: torch.Tensor,
           block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(TR rank per image, IR rank per text capped at max(KS)) under each tie rule, from row blocks."""
    depth = max(KS)
    if n_images == 0 or len(txt2img) == 0:
        raise ValueError("retrieval metrics need at least one image and one text")
    tr = {rule: torch.empty(n_images, dtype=torch.long, device=txt2img.device) for rule in (*TIE_RULES, "strict")}
    gt = top = None  # per caption: its ground-truth score; the `depth` best non-ground-truth scores so far
    for r0 in range(0, n_images, block):
        r1 = min(r0 + block, n_images)
        scores = score_rows(r0, r1).nan_to_num(nan=float("-inf"))
        others = scores.clone()
        cols = ((txt2img >= r0) & (txt2img < r1)).nonzero().squeeze(1)
        rows = txt2img[cols] - r0
        if gt is None:
            gt = torch.empty(len(txt2img), dtype=others.dtype, device=others.device)
        gt[cols] = others[rows, cols]
        best_gt = torch.full((r1 - r0,), float("-inf"), dtype=others.dtype, device=others.device)
        best_gt.scatter_reduce_(0, rows, gt[cols], reduce="amax")
        others[rows, cols] = float("-inf")  # ground-truth entries never compete
        tr["pessimistic"][r0:r1] = (others >= best_gt[:, None]).sum(1)
        tr["strict"][r0:r1] = (others > best_gt[:, None]).sum(1)
        tr["argsort"][r0:r1] = torch.where(best_gt == float("-inf"), tr["pessimistic"][r0:r1], tr["strict"][r0:r1])
        for i in _tied(tr["strict"][r0:r1], tr["pessimistic"][r0:r1], depth, best_gt).tolist():
            tr["argsort"][r0 + i] = authors_rank(scores[i], (txt2img == r0 + i).nonzero().squeeze(1))
        block_top = others.topk(min(depth, r1 - r0), dim=0).values
        pool = block_top if top is None else torch.cat([top, block_top])
        top = pool.topk(min(depth, len(pool)), dim=0).values
    ir_pessimistic, ir_strict = (top >= gt[None, :]).sum(0), (top > gt[None, :]).sum(0)
    ir_argsort = torch.where(gt == float("-inf"), ir_pessimistic, ir_strict)
    tied = _tied(ir_strict, ir_pessimistic, depth, gt)
    if len(tied):  # second pass: the full image column of each tied caption
        columns = torch.cat([score_rows(r0, min(r0 + block, n_images))[:, tied].nan_to_num(nan=float("-inf"))
                             for r0 in range(0, n_images, block)]).T
        for j, column in zip(tied.tolist(), columns):
            ir_argsort[j] = min(authors_rank(column, txt2img[j:j + 1]), depth)
    return {"pessimistic": (tr["pessimistic"].cpu(), ir_pessimistic.cpu()),
            "argsort": (tr["argsort"].cpu(), ir_argsort.cpu())}


def _tied(strict: torch.Tensor, pessimistic: torch.Tensor, depth: int, truth: torch.Tensor) -> torch.Tensor:
    """Queries whose rank a tie can move below `depth` (all others rank the same under both rules);
    a -inf (NaN) ground truth stays a miss under both rules."""
    return ((strict < depth) & (pessimistic > strict) & (truth > float("-inf"))).nonzero().squeeze(1)


def _summarise(tr_rank: torch.Tensor, ir_rank: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in KS:
        out[f"ir{k}"] = 100.0 * (ir_rank < k).double().mean().item()
    for k in KS:
        out[f"tr{k}"] = 100.0 * (tr_rank < k).double().mean().item()
    out["ir_mean"] = sum(out[f"ir{k}"] for k in KS) / len(KS)
    out["tr_mean"] = sum(out[f"tr{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["ir_mean"] + out["tr_mean"]) / 2
    return out


def _check_rule(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule '{ties}' (choose from {', '.join(TIE_RULES)})")


def metrics_by_rule(scores: torch.Tensor, txt2img: torch.Tensor, block: int = 1024) -> dict[str, dict[str, float]]:
    """The metrics of an (images x texts) score matrix under every tie rule, from one pass."""
    scores = torch.as_tensor(scores)
    scores = scores if scores.is_floating_point() else scores.double()
    n_images, n_texts = scores.shape
    txt2img = _check_txt2img(txt2img, n_images, n_texts).to(scores.device)
    ranks = _ranks(lambda a, b: scores[a:b], n_images, txt2img, block)
    return {rule: _summarise(*ranks[rule]) for rule in TIE_RULES}


def retrieval_metrics(scores: torch.Tensor, txt2img: torch.Tensor, block: int = 1024,
                      ties: Ties = "pessimistic") -> dict[str, float]:
    """Percent ir1 ir5 ir10 tr1 tr5 tr10, ir_mean, tr_mean, r_mean from an (images x texts) matrix."""
    _check_rule(ties)
    return metrics_by_rule(scores, txt2img, block)[ties]


@torch.no_grad()
def embedding_metrics_by_rule(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor,
                              block: int = 1024) -> dict[str, dict[str, float]]:
    """Metrics under every tie rule from L2-normalised embeddings, computing score blocks on the fly on
    their device (cosine; the temperature is a positive scale and does not change ranks)."""
    image_emb, text_emb = image_emb.float(), text_emb.float().to(image_emb.device)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    txt2img = _check_txt2img(txt2img, n_images, n_texts).to(image_emb.device)
    ranks = _ranks(lambda a, b: image_emb[a:b] @ text_emb.T, n_images, txt2img, block)
    return {rule: _summarise(*ranks[rule]) for rule in TIE_RULES}


def retrieval_metrics_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor,
                                      block: int = 1024, ties: Ties = "pessimistic") -> dict[str, float]:
    """`retrieval_metrics` of the cosine scores of L2-normalised embeddings."""
    _check_rule(ties)
    return embedding_metrics_by_rule(image_emb, text_emb, txt2img, block)[ties]


def with_other_rule(by_rule: dict[str, dict[str, float]], ties: Ties) -> dict[str, float]:
    """The metrics under `ties`, plus every other rule's as "<rule>_<metric>" (flat floats, as
    records and trackers want them), so each record says what the other rule would have given."""
    _check_rule(ties)
    out = dict(by_rule[ties])
    for rule, metrics in by_rule.items():
        if rule != ties:
            out.update({f"{rule}_{key}": value for key, value in metrics.items()})
    return out


@torch.inference_mode()
def encode_images(model: DualEncoder, images: np.ndarray | torch.Tensor, device: torch.device,
                  batch_size: int = 512, amp: bool = True) -> torch.Tensor:
    """Normalised image embeddings of uint8 (n, 3, H, W) images, bf16 autocast on GPU if `amp`.

    `images` may be a numpy array or memmap (copied batch by batch) or a tensor already on `device`
    (repeated evaluations upload the test split once).
    """
    out = []
    use_amp = amp and device.type == "cuda"
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = (chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(model.encode_image(normalize(batch)).float())
    return torch.cat(out)


@torch.inference_mode()
def encode_texts(model: DualEncoder, text_features: torch.Tensor, device: torch.device,
                 batch_size: int = 4096) -> torch.Tensor:
    return torch.cat([model.encode_text(text_features[s:s + batch_size].to(device).float())
                      for s in range(0, len(text_features), batch_size)])


def test_retrieval(model: DualEncoder, images: np.ndarray | torch.Tensor, text_features: torch.Tensor,
                   txt2img: np.ndarray | torch.Tensor, device: torch.device, amp: bool = True,
                   ties: Ties = "pessimistic") -> dict[str, float]:
    """Retrieval metrics (percent) of `model` in eval mode under `ties`, plus the other rule's as
    "<rule>_<metric>"; restores the previous train/eval mode. 2-D `images` are taken as their
    embeddings already (a frozen backbone's, computed once: lors.evaluation.protocol)."""
    was_training = model.training
    model.eval()
    try:
        img = images.to(device) if images.ndim == 2 else encode_images(model, images, device, amp=amp)
        txt = encode_texts(model, text_features, device)
    finally:
        model.train(was_training)
    return with_other_rule(embedding_metrics_by_rule(img, txt, torch.as_tensor(txt2img)), ties)


test_retrieval.__test__ = False  # not a pytest test, despite the name
