"""Load Flickr8k, encode its captions, build the paper's dual encoder, score an untrained model.

    python examples/flickr8k_untrained.py ../shared/data/flickr8k

An untrained model should sit near chance: R@K ~ K/1000 for IR and ~ 5K/5000 for TR on 1,000 test
images with 5 captions each. Pretrained weights are off so this runs offline.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from lors.config import Params
from lors.data import load_split, load_text_features
from lors.data.prepare import prepare_dataset
from lors.data.text_features import embed_dataset
from lors.models import build_dual_encoder
from lors.retrieval import test_retrieval


def main(root: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="lors-flickr8k-"))
    params = Params.model_validate({
        "grid": {"datasets": ["flickr8k"]}, "work_dir": str(work), "device": "cpu",
        "datasets": {"flickr8k": {"kind": "flickr8k", "root": str(root), "image_size": 64}},
        "text_encoder": {"name": "minilm", "pooling": "cls"},  # offline stand-in for bert-base-uncased
        "model": {"image_encoder": "nfnet_l0", "pretrained": False},
        "tracking": {"enabled": False},
    })
    prepare_dataset(params, "flickr8k")  # decode once -> uint8 store (6000/1000/1000 images)
    embed_dataset(params, "flickr8k")  # frozen text features, cached
    test = load_split(params, "flickr8k", "test")
    features = load_text_features(params, "flickr8k", "test")
    torch.manual_seed(0)
    model = build_dual_encoder("nfnet_l0", features.shape[1], pretrained=False)
    metrics = test_retrieval(model, test.images, features, test.txt2img, torch.device("cpu"))
    print(f"Flickr8k test: {test.n_images} images, {test.n_captions} captions, text dim {features.shape[1]}")
    print(" ".join(f"{k}={v:.2f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/flickr8k"))
