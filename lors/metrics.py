"""Image-text retrieval metrics with the BLIP/LoRS protocol (method.md 4.3).

IR (text -> image): the rank of a caption's single ground-truth image.
TR (image -> text): the best (smallest) rank among the image's ground-truth captions.
R@K = percent of queries whose rank is < K. Scores are processed in row blocks, so the full
(n_images x n_texts) matrix never has to exist: COCO's 5,000 x 25,010 runs in a few blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KS = (1, 5, 10)


def _check_txt2img(txt2img: torch.Tensor, n_images: int, n_texts: int) -> torch.Tensor:
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(txt2img.shape)}, expected ({n_texts},)")
    if n_texts and (txt2img.min() < 0 or txt2img.max() >= n_images):
        raise ValueError("txt2img refers to an image index outside the score matrix")
    return txt2img


def _ranks(score_rows: Callable[[int, int], torch.Tensor], n_images: int, txt2img: torch.Tensor,
           gt_scores: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TR rank per image and IR rank per text, counting strictly better non-ground-truth candidates."""
    best_gt = torch.full((n_images,), float("-inf"), dtype=gt_scores.dtype)
    best_gt.scatter_reduce_(0, txt2img, gt_scores, reduce="amax")
    tr_rank = torch.empty(n_images, dtype=torch.long)
    ir_rank = torch.zeros(len(txt2img), dtype=torch.long)
    for r0 in range(0, n_images, block):
        r1 = min(r0 + block, n_images)
        scores = score_rows(r0, r1).to(gt_scores.dtype)
        is_gt = txt2img[None, :] == torch.arange(r0, r1)[:, None]
        tr_rank[r0:r1] = ((scores > best_gt[r0:r1, None]) & ~is_gt).sum(1)
        ir_rank += ((scores > gt_scores[None, :]) & ~is_gt).sum(0)
    return tr_rank, ir_rank


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
    n_images, n_texts = scores.shape
    txt2img = _check_txt2img(txt2img, n_images, n_texts)
    gt = scores[txt2img, torch.arange(n_texts)].double()
    tr_rank, ir_rank = _ranks(lambda a, b: scores[a:b], n_images, txt2img, gt, block)
    return _summarise(tr_rank, ir_rank)


@torch.no_grad()
def retrieval_metrics_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor,
                                      block: int = 1024) -> dict[str, float]:
    """Same metrics from L2-normalised embeddings, computing score blocks on the fly (cosine; the
    temperature is a positive scale and does not change ranks)."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    txt2img = _check_txt2img(txt2img, n_images, n_texts).to(image_emb.device)
    gt = (image_emb[txt2img] * text_emb).sum(-1)
    tr_rank, ir_rank = _ranks(lambda a, b: (image_emb[a:b] @ text_emb.T).cpu(), n_images, txt2img.cpu(),
                              gt.cpu().float(), block)
    return _summarise(tr_rank, ir_rank)
