"""Retrieval metrics (method.md 4.3): hand-computed cases, the authors' BLIP code written out as an
independent oracle (both tie rules), COCO size."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lors import retrieval
from lors.config import EvaluateConfig
from lors.retrieval import (METRICS, TIE_RULES, metrics_by_rule, retrieval_metrics,
                            retrieval_metrics_from_embeddings)
from lors.models import build_dual_encoder


def _summary(ir: np.ndarray, tr: np.ndarray) -> dict[str, float]:
    out = {f"ir{k}": 100.0 * np.mean(ir < k) for k in (1, 5, 10)} | {f"tr{k}": 100.0 * np.mean(tr < k) for k in (1, 5, 10)}
    out["ir_mean"] = (out["ir1"] + out["ir5"] + out["ir10"]) / 3
    out["tr_mean"] = (out["tr1"] + out["tr5"] + out["tr10"]) / 3
    out["r_mean"] = (out["ir_mean"] + out["tr_mean"]) / 2
    return out


def blip_metrics(scores: np.ndarray, txt2img: np.ndarray) -> dict[str, float]:
    """BLIP's `itm_eval` written out as a loop over queries (argsort, best GT rank for TR)."""
    img2txt = [np.flatnonzero(txt2img == i) for i in range(scores.shape[0])]
    tr = np.array([min(np.where(np.argsort(row)[::-1] == j)[0][0] for j in img2txt[i]) for i, row in enumerate(scores)])
    ir = np.array([np.where(np.argsort(scores[:, j])[::-1] == txt2img[j])[0][0] for j in range(scores.shape[1])])
    return _summary(ir, tr)


def authors_metrics(scores: np.ndarray, txt2img: np.ndarray) -> dict[str, float]:
    """The authors' evaluation as written (LoRS:src/epoch.py): `epoch_test` keeps each row's top-128
    scores (torch topk) in a -100 matrix, once per direction, then `itm_eval` ranks by np.argsort."""
    def top_k_matrix(sims: torch.Tensor) -> np.ndarray:
        out = torch.full(sims.shape, -100.0, dtype=sims.dtype)
        for i, row in enumerate(sims):
            values, index = row.topk(k=min(128, len(row)), dim=0)
            out[i, index] = values
        return out.numpy()

    sims = torch.from_numpy(scores)
    i2t, t2i = top_k_matrix(sims), top_k_matrix(sims.t())
    img2txt = {i: list(np.flatnonzero(txt2img == i)) for i in range(scores.shape[0])}
    tr = np.zeros(i2t.shape[0])
    for index, score in enumerate(i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        tr[index] = rank
    ir = np.zeros(t2i.shape[0])
    for index, score in enumerate(t2i):
        inds = np.argsort(score)[::-1]
        ir[index] = np.where(inds == txt2img[index])[0][0]
    return _summary(ir, tr)


def assert_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(METRICS)
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_hand_computed_multi_caption_case():
    # 3 images x 2 captions; TR takes each image's best ground-truth caption, IR the single GT image
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2, 0.0],
                           [0.5, 0.6, 0.4, 0.7, 0.95, 0.1],
                           [0.2, 0.3, 0.1, 0.2, 0.3, 0.9]])
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    # TR ranks: img0 best GT 0.9 -> 0; img1 best GT 0.7 beaten by caption 4 (0.95) -> 1; img2 -> 0
    # IR ranks per caption: 0, 2, 1, 0, 1, 0
    tr = {"tr1": 200 / 3, "tr5": 100.0, "tr10": 100.0}
    ir = {"ir1": 50.0, "ir5": 100.0, "ir10": 100.0}
    want = {**ir, **tr, "ir_mean": 250 / 3, "tr_mean": (200 / 3 + 200) / 3}
    want["r_mean"] = (want["ir_mean"] + want["tr_mean"]) / 2
    assert_metrics(retrieval_metrics(scores, txt2img), want)


def test_six_caption_image_uses_its_best_caption_and_r_at_5_and_10():
    # 12 images; image 0 has 6 captions (as 10 COCO test images do), the others 1 each: 17 captions
    n_img, txt2img = 12, np.array([0] * 6 + list(range(1, 12)))
    scores = np.zeros((n_img, len(txt2img)))
    others = np.arange(6, 17)
    scores[0, others] = [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.65, 0.7, 0.8, 0.9]  # 11 distractors
    scores[0, :5] = 0.33  # beaten by the 6 distractors from 0.4 up
    scores[0, 5] = 0.55  # beaten by 0.6, 0.65, 0.7, 0.8, 0.9 -> image 0's TR rank is 5
    metrics = retrieval_metrics(torch.tensor(scores), torch.tensor(txt2img))
    # TR: image 0 (rank 5) is a TR@10 but not a TR@5 hit; images 1..11 have all-zero rows (ties, misses)
    assert (metrics["tr1"], metrics["tr5"], metrics["tr10"]) == pytest.approx((0.0, 0.0, 100 / 12))
    # IR: image 0's six captions find it first; the other 11 captions tie with 10 zero images and lose
    # to image 0 -> rank 11, a miss even at R@10
    assert (metrics["ir1"], metrics["ir5"], metrics["ir10"]) == pytest.approx((600 / 17,) * 3)


def test_ties_count_against_the_query():
    n = 12
    flat = retrieval_metrics(torch.ones(n, n), torch.arange(n))  # a collapsed model: every score equal
    assert all(flat[k] == 0.0 for k in METRICS)
    # a duplicate caption: image 0's only caption ties with image 1's caption in image 0's row
    scores = torch.eye(3) * 0.5 + 0.1
    scores[0, 1] = scores[0, 0]
    metrics = retrieval_metrics(scores, torch.arange(3))
    assert metrics["tr1"] == pytest.approx(200 / 3)  # image 0: caption 1 ties with its caption -> rank 1
    assert metrics["ir1"] == pytest.approx(200 / 3)  # caption 1: image 0 ties with image 1 -> rank 1


@pytest.mark.parametrize("ties", TIE_RULES)
def test_nan_scores_are_misses_not_hits(ties):
    scores = torch.eye(4) + 0.01 * torch.arange(16.0).view(4, 4)
    scores[2] = float("nan")
    metrics = retrieval_metrics(scores, torch.arange(4), ties=ties)
    assert metrics["tr1"] == pytest.approx(75.0) and metrics["ir1"] == pytest.approx(75.0)
    diverged = retrieval_metrics(torch.full((12, 12), float("nan")), torch.arange(12), ties=ties)
    assert all(diverged[k] == 0.0 for k in METRICS)


@pytest.mark.parametrize("block", [1, 3, 7, 1024])
def test_blocked_single_pass_matches_blip_loop(block):
    rng = np.random.default_rng(0)
    txt2img = np.concatenate([np.repeat(np.arange(37), 5), [3, 20]])  # two 6-caption images
    scores = rng.normal(size=(37, len(txt2img))) + 2.0 * (txt2img[None, :] == np.arange(37)[:, None])
    assert_metrics(retrieval_metrics(torch.tensor(scores), torch.tensor(txt2img), block=block),
                   blip_metrics(scores, txt2img))


def test_embedding_path_equals_score_path():
    torch.manual_seed(0)
    txt2img = torch.arange(30).repeat_interleave(3)
    img = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    txt = torch.nn.functional.normalize(img[txt2img] + 0.8 * torch.randn(90, 16), dim=1)
    got = retrieval_metrics_from_embeddings(img, txt, txt2img, block=8)
    assert_metrics(got, blip_metrics((img @ txt.T).double().numpy(), txt2img.numpy()))
    assert 0 < got["r_mean"] < 100


def test_bad_txt2img_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(3, 4), torch.tensor([0, 1, 2, 3]))


def test_test_retrieval_accepts_memmap_style_arrays_and_device_tensors():
    torch.manual_seed(0)
    model = build_dual_encoder("test_nfnet", text_dim=8, pretrained=False)
    images = np.random.default_rng(0).integers(0, 255, (6, 3, 16, 16), dtype=np.uint8)
    feats, txt2img = torch.randn(12, 8), np.repeat(np.arange(6), 2)
    model.train()
    a = retrieval.test_retrieval(model, images, feats, txt2img, torch.device("cpu"))
    b = retrieval.test_retrieval(model, torch.from_numpy(images), feats, torch.from_numpy(txt2img), torch.device("cpu"))
    assert a == b and model.training  # mode restored
    assert set(a) == set(METRICS) | {f"argsort_{m}" for m in METRICS}  # the other rule rides along, prefixed
    a = {m: a[m] for m in METRICS}
    with torch.no_grad():
        model.eval()
        from lors.data.transforms import normalize
        want = retrieval_metrics(model(normalize(torch.from_numpy(images)), feats), torch.from_numpy(txt2img))
    assert_metrics(a, want)


def test_coco_size_from_random_embeddings():
    """5,000 images x 25,010 captions (4,990 with 5 captions, 10 with 6), as COCO's 5k test split; a
    benchmark (time printed, not asserted) checked against an independent float64 count."""
    gen = torch.Generator().manual_seed(0)
    txt2img = torch.cat([torch.arange(5000).repeat_interleave(5), torch.arange(10)]).sort().values
    assert len(txt2img) == 25_010
    img = torch.nn.functional.normalize(torch.randn(5000, 64, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(img[txt2img] + 1.2 * torch.randn(25_010, 64, generator=gen), dim=1)
    start = time.perf_counter()
    got = retrieval_metrics_from_embeddings(img, txt, txt2img)
    elapsed = time.perf_counter() - start
    print(f"\nCOCO-size retrieval metrics: {elapsed:.2f} s")

    # independent count: float64 scores; rank = non-GT candidates scoring >= the GT
    i64, t64, t2i = img.double().numpy(), txt.double().numpy(), txt2img.numpy()
    gt = np.einsum("jd,jd->j", i64[t2i], t64)
    ir_rank = np.zeros(len(t2i), dtype=np.int64)
    tr_rank = np.zeros(5000, dtype=np.int64)
    for r0 in range(0, 5000, 500):
        s = i64[r0:r0 + 500] @ t64.T
        own = t2i[None, :] == np.arange(r0, r0 + 500)[:, None]
        ir_rank += ((s >= gt[None, :]) & ~own).sum(0)
        best = np.where(own, s, -np.inf).max(1)
        tr_rank[r0:r0 + 500] = ((s >= best[:, None]) & ~own).sum(1)
    for k in (1, 5, 10):
        # float32 vs float64 scores may flip a near-tie: allow one query either way
        assert got[f"ir{k}"] == pytest.approx(100 * np.mean(ir_rank < k), abs=100 / 25_010 + 1e-9)
        assert got[f"tr{k}"] == pytest.approx(100 * np.mean(tr_rank < k), abs=100 / 5000 + 1e-9)
    assert 1 < got["r_mean"] < 99


def tied_scores(seed: int, n_images: int, per_image: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores with many exact ties: few distinct values, and duplicate captions (equal columns), as
    small models score the duplicated captions of ucm-captions."""
    rng = np.random.default_rng(seed)
    txt2img = np.repeat(np.arange(n_images), per_image)
    scores = rng.integers(0, levels, (n_images, len(txt2img))).astype(np.float32) / levels
    scores += (txt2img[None, :] == np.arange(n_images)[:, None]) * rng.integers(0, 2, (n_images, len(txt2img))) / levels
    for j in rng.choice(len(txt2img), len(txt2img) // 3, replace=False):  # a third copy another caption's scores
        scores[:, j] = scores[:, rng.integers(len(txt2img))]
    return scores.astype(np.float32), txt2img


@pytest.mark.parametrize("block", [1, 7, 1024])
@pytest.mark.parametrize("shape", [(12, 3, 3), (40, 5, 4), (60, 4, 6)])  # > 128 texts: the top-128 fill matters
def test_argsort_rule_is_the_authors_itm_eval_exactly(block, shape):
    scores, txt2img = tied_scores(sum(shape), *shape)
    want = authors_metrics(scores, txt2img)
    got = retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(txt2img), block=block, ties="argsort")
    assert got == want  # exact: the same numpy call orders the tied candidates
    pessimistic = retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(txt2img), block=block)
    assert all(pessimistic[m] <= got[m] for m in METRICS) and pessimistic["r_mean"] < got["r_mean"]


def test_argsort_rule_on_embeddings_with_duplicates():
    torch.manual_seed(0)
    txt2img = torch.arange(50).repeat_interleave(5)
    img = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    txt = torch.nn.functional.normalize(img[txt2img] + 0.9 * torch.randn(250, 8), dim=1)
    img[1::2] = img[0::2]  # duplicate images and captions: bit-identical embeddings, exact ties
    txt[5:250:10] = txt[0:250:10]
    both = retrieval.embedding_metrics_by_rule(img, txt, txt2img, block=16)
    assert both["argsort"] == authors_metrics((img @ txt.T).numpy(), txt2img.numpy())
    assert both["pessimistic"] != both["argsort"]
    assert both == metrics_by_rule(img @ txt.T, txt2img)


def test_collapsed_model_under_each_rule():
    n = 20
    both = metrics_by_rule(torch.ones(n, n), torch.arange(n))
    assert all(both["pessimistic"][k] == 0.0 for k in METRICS)
    # argsort hands the tie to numpy's order: not 0, and exactly what the authors' code reports
    assert both["argsort"] == authors_metrics(np.ones((n, n), dtype=np.float32), np.arange(n))
    assert both["argsort"]["r_mean"] > 0


def test_tie_rule_setting():
    assert TIE_RULES == ("pessimistic", "argsort")
    assert EvaluateConfig().tie_rule("reference") == "argsort"
    assert EvaluateConfig().tie_rule("clean") == "pessimistic"
    assert EvaluateConfig(ties="pessimistic").tie_rule("reference") == "pessimistic"
    with pytest.raises(ValueError, match="tie rule"):
        retrieval_metrics(torch.eye(3), torch.arange(3), ties="optimistic")
