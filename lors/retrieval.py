"""Test retrieval of a dual encoder on a prepared split: encode in large batches, then rank."""

from __future__ import annotations

import numpy as np
import torch

from lors.data.transforms import normalize
from lors.metrics import retrieval_metrics_from_embeddings
from lors.models.dual import DualEncoder


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
                   txt2img: np.ndarray | torch.Tensor, device: torch.device, amp: bool = True) -> dict[str, float]:
    """Retrieval metrics (percent) of `model` in eval mode; restores the previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, images, device, amp=amp)
        txt = encode_texts(model, text_features, device)
    finally:
        model.train(was_training)
    return retrieval_metrics_from_embeddings(img, txt, torch.as_tensor(txt2img))


test_retrieval.__test__ = False  # not a pytest test, despite the name
