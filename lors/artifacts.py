"""What a synthetic set looks like, for people: image grid, nearest real captions, learned similarity.

The distill and select stages log these to MLflow (`log_synset_artifacts`); the report reuses the
figures. Synthetic texts are vectors in the frozen text encoder's space, so they are shown through
the real training captions nearest to them (cosine), as the authors visualise them. The similarity
figure is the paper's Figure 3: the learned matrix S~ as a heatmap and the histogram of its diagonal
and off-diagonal entries. matplotlib and PIL are imported inside the functions that draw.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lors.data.transforms import denormalize
from lors.io import atomic_path
from lors.synset import FILENAME, SyntheticSet


def image_grid(images: torch.Tensor, max_images: int = 64, pad: int = 2) -> np.ndarray:
    """CLIP-normalised (n, 3, H, W) -> one (rows*H, cols*W, 3) uint8 picture of the first images."""
    images = denormalize(images[:max_images].detach().cpu())
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return Path(path)


def nearest_captions(texts: torch.Tensor, train_text_features: torch.Tensor, train_captions: Sequence[str],
                     k: int = 3) -> list[list[tuple[str, float]]]:
    """For each synthetic text, the k training captions with the highest cosine similarity."""
    if len(train_captions) != train_text_features.shape[0]:
        raise ValueError(f"{len(train_captions)} captions but {train_text_features.shape[0]} caption features")
    synthetic = torch.nn.functional.normalize(texts.detach().float().cpu(), dim=1)
    real = torch.nn.functional.normalize(train_text_features.detach().float().cpu(), dim=1)
    scores, index = (synthetic @ real.T).topk(min(k, real.shape[0]), dim=1)
    return [[(train_captions[j], s) for j, s in zip(row_index.tolist(), row_scores.tolist())]
            for row_index, row_scores in zip(index, scores)]


def nearest_captions_text(neighbours: list[list[tuple[str, float]]]) -> str:
    """One block per synthetic pair: its index, then 'cosine<TAB>caption' lines."""
    blocks = []
    for i, row in enumerate(neighbours):
        blocks.append(f"# synthetic text {i}\n" + "\n".join(f"{score:.4f}\t{caption}" for caption, score in row))
    return "\n\n".join(blocks) + "\n"


def similarity_figure(similarity: torch.Tensor, max_size: int = 100, title: str = "") -> Any:
    """Heatmap of S~ (first max_size rows/columns) beside the histogram of diagonal vs off-diagonal entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = similarity.detach().float().cpu().numpy()
    diagonal = np.diag(s)
    off = s[~np.eye(s.shape[0], dtype=bool)]
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(9, 3.8))
    shown = s[:max_size, :max_size]
    bound = max(float(np.abs(shown).max()), 1e-6)
    image = ax_map.imshow(shown, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax_map.set_xlabel("synthetic text")
    ax_map.set_ylabel("synthetic image")
    ax_map.set_title("learned similarity" if s.shape[0] <= max_size else f"learned similarity (first {max_size})")
    fig.colorbar(image, ax=ax_map, fraction=0.046)
    bins = np.linspace(min(s.min(), 0.0), max(s.max(), 1.0), 41)
    ax_hist.hist(off, bins=bins, alpha=0.7, label=f"off-diagonal ({off.size})", log=True)
    ax_hist.hist(diagonal, bins=bins, alpha=0.7, label=f"diagonal ({diagonal.size})", log=True)
    ax_hist.set_xlabel("similarity value")
    ax_hist.set_ylabel("count")
    ax_hist.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(figure: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return Path(path)


def write_synset_artifacts(synset: SyntheticSet, out_dir: str | Path, train_captions: Sequence[str],
                           train_text_features: torch.Tensor) -> list[Path]:
    """Write images.png, nearest_captions.txt and similarity.png for one set; return the paths."""
    out_dir = Path(out_dir)
    grid = save_png(image_grid(synset.images), out_dir / "images.png")
    captions = out_dir / "nearest_captions.txt"
    with atomic_path(captions) as tmp:
        tmp.write_text(nearest_captions_text(nearest_captions(synset.texts, train_text_features, train_captions)))
    figure = similarity_figure(synset.similarity, title=_set_name(synset))
    similarity = out_dir / "similarity.png"
    save_figure(figure, similarity)
    return [grid, captions, similarity]


def log_synset_artifacts(tracker: Any, synset: SyntheticSet, train_captions: Sequence[str],
                         train_text_features: torch.Tensor) -> None:
    """Log the image grid, nearest captions, similarity figure and the set itself to the tracker's run."""
    if not tracker.active:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_synset_artifacts(synset, tmp, train_captions, train_text_features):
            tracker.log_artifact(path, "synset")
        synset.save(Path(tmp) / FILENAME)
        tracker.log_artifact(Path(tmp) / FILENAME, "synset")


def _set_name(synset: SyntheticSet) -> str:
    meta = synset.meta
    return " ".join(str(meta[k]) for k in ("dataset", "method", "budget") if k in meta)
