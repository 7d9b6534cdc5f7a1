"""How far the authors' train-mode text features are from the cached eval-mode ones lors-bench uses.

The authors' experts call the frozen text encoder inside the training loop with the model in train
mode, so its dropout (p = 0.1 in BERT and MiniLM) perturbs every caption's [CLS] feature anew each
time; lors-bench encodes each caption once, in eval mode (method.md 8.9). This prints, over the
distinct train captions of a Karpathy-layout folder, the cosine between an eval-mode feature and a
train-mode draw, and the train-mode draw's distance to the eval feature relative to the typical
distance between two different captions.

    .venv/bin/python benchmarks/side_by_side/text_dropout.py --data ../shared/data/ucm-captions
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lors.data.captions import pre_caption  # noqa: E402
from lors.data.text_features import load_text_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-captions", type=int, default=1000)
    args = parser.parse_args()
    rows = json.loads((args.data / "flickr30k_train.json").read_text())
    captions = sorted({pre_caption(row["caption"], 30) for row in rows})[:args.max_captions]
    encoder = load_text_encoder("minilm", torch.device("cpu"))
    model, tokenizer = encoder.model, encoder.tokenizer
    batch = tokenizer(captions, return_tensors="pt", padding=True, truncation=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        clean = model(**batch).last_hidden_state[:, 0]
        model.train()
        noisy = model(**batch).last_hidden_state[:, 0]
    cos = torch.nn.functional.cosine_similarity(clean, noisy)
    shift = (noisy - clean).norm(dim=1)
    between = torch.cdist(clean, clean)
    typical = between[~torch.eye(len(clean), dtype=torch.bool)].median()
    nearest = (between + torch.eye(len(clean)) * 1e9).min(1).values
    print(f"{len(captions)} distinct train captions, all-MiniLM-L6-v2 [CLS]")
    print(f"cosine(eval, train-mode draw): mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"train-mode shift / median distance between captions: {(shift / typical).mean():.3f}")
    print(f"share of captions whose shift exceeds the distance to their nearest other caption: "
          f"{(shift > nearest).float().mean():.3f}")


if __name__ == "__main__":
    main()
