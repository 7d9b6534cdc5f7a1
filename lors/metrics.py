"""Image-text retrieval metrics with the BLIP/LoRS protocol (method.md 4.3).

IR (text -> image): the rank of a caption's single ground-truth image.
TR (image -> text): the best (smallest) rank among the image's ground-truth captions.
R@K = percent of queries whose rank is < K. A rank counts the non-ground-truth candidates scoring at
least as high as the ground truth: ties resolve against the query (BLIP's argsort leaves them to
index order), so a collapsed model whose scores are all equal scores 0, not 100, and NaN scores count
as -inf. Every comparison is made between entries of the same computed score block (a ground-truth
score recomputed another way could differ in the last bit and flip a tie).

Scores are processed in row blocks (rows = images), so the full (n_images x n_texts) matrix never has
to exist: COCO's 5,000 x 25,010 runs in a few blocks on the scores' own device. TR ranks are exact
per row block. IR ranks need each caption's ground-truth score before comparing, so each block only
keeps the top-`max(KS)` non-ground-truth scores of every caption; R@1/5/10 are exact with that
(an IR rank is reported as min(rank, max(KS))).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KS = (1, 5, 10)
METRICS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "ir_mean", "tr_mean", "r_mean")


def _check_txt2img(txt2img: torch.Tensor, n_images: int, n_texts: int) -> torch.Tensor:
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(txt2img.shape)}, expected ({n_texts},)")
    if n_texts and (txt2img.min() < 0 or txt2img.max() >= n_images):
        raise ValueError("txt2img refers to an image index outside the score matrix")
    return txt2img


def _ranks(score_rows: Callable[[int, int], torch.Tensor], n_images: int, txt2img: torch.Tensor,
           block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TR rank per image (exact) and IR rank per text (capped at max(KS)), one pass over row blocks."""
    depth = max(KS)
    if n_images == 0 or len(txt2img) == 0:
        raise ValueError("retrieval metrics need at least one image and one text")
    tr_rank = torch.empty(n_images, dtype=torch.long, device=txt2img.device)
    gt = top = None  # per caption: its ground-truth score; the `depth` best non-ground-truth scores so far
    for r0 in range(0, n_images, block):
        r1 = min(r0 + block, n_images)
        others = score_rows(r0, r1).nan_to_num(nan=float("-inf"))  # a fresh tensor: safe to edit in place
        cols = ((txt2img >= r0) & (txt2img < r1)).nonzero().squeeze(1)
        rows = txt2img[cols] - r0
        if gt is None:
            gt = torch.empty(len(txt2img), dtype=others.dtype, device=others.device)
        gt[cols] = others[rows, cols]
        best_gt = torch.full((r1 - r0,), float("-inf"), dtype=others.dtype, device=others.device)
        best_gt.scatter_reduce_(0, rows, gt[cols], reduce="amax")
        others[rows, cols] = float("-inf")  # ground-truth entries never compete
        tr_rank[r0:r1] = (others >= best_gt[:, None]).sum(1)
        block_top = others.topk(min(depth, r1 - r0), dim=0).values
        pool = block_top if top is None else torch.cat([top, block_top])
        top = pool.topk(min(depth, len(pool)), dim=0).values
    ir_rank = (top >= gt[None, :]).sum(0)
    return tr_rank.cpu(), ir_rank.cpu()


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


def retrieval_metrics(scores: torch.Tensor, txt2img: torch.Tensor, block: int = 1024) -> dict[str, float]:
    """Percent ir1 ir5 ir10 tr1 tr5 tr10, ir_mean, tr_mean, r_mean from an (images x texts) matrix."""
    scores = torch.as_tensor(scores)
    scores = scores if scores.is_floating_point() else scores.double()
    n_images, n_texts = scores.shape
    txt2img = _check_txt2img(txt2img, n_images, n_texts).to(scores.device)
    tr_rank, ir_rank = _ranks(lambda a, b: scores[a:b], n_images, txt2img, block)
    return _summarise(tr_rank, ir_rank)


@torch.no_grad()
def retrieval_metrics_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor,
                                      block: int = 1024) -> dict[str, float]:
    """Same metrics from L2-normalised embeddings, computing score blocks on the fly on their device
    (cosine; the temperature is a positive scale and does not change ranks)."""
    image_emb, text_emb = image_emb.float(), text_emb.float().to(image_emb.device)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    txt2img = _check_txt2img(txt2img, n_images, n_texts).to(image_emb.device)
    tr_rank, ir_rank = _ranks(lambda a, b: image_emb[a:b] @ text_emb.T, n_images, txt2img, block)
    return _summarise(tr_rank, ir_rank)
