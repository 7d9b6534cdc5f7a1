"""Runtime shims that let the authors' LoRS scripts run on CPU here, changing none of their logic.

Installed in the authors' process before their script runs (`install`), never written into their
files. Each shim replaces something this machine lacks or that only names a file/device:

- CUDA: `.to('cuda')` on tensors and modules goes to the CPU (their `args.device` is already 'cpu'),
  and `.cpu()` of a CPU tensor returns a copy, as it does from the GPU: buffer.py snapshots the live
  parameters with `p.detach().cpu()`, which on a CPU would alias them (every saved epoch = the last);
- wandb: a recorder with init/log/finish (their numbers are read from what they log);
- clip, kornia: empty modules (imported, used only for the CLIP text encoder and DSA, both off);
- scipy.ndimage.interpolation: the old alias of scipy.ndimage (removed in recent SciPy);
- timm.create_model: pretrained=False (random init: their code asks for ImageNet weights for every
  name but nfnet, which needs the network);
- get_bert_stuff: the bundled all-MiniLM-L6-v2 (a BertModel) instead of bert-base-uncased from disk
  (and `batch_encode_plus`, removed in transformers 5, as the tokenizer call it always was);
- ProjectionHead: built with the real feature sizes (their CLIPModel_full hard-codes 768 for BERT and
  1000 for unknown image encoders; MiniLM gives 384, timm test_nfnet 192 here).
- DataLoader of the val/test splits: no worker processes (they only load fixed, unaugmented images
  in order; forking 4 workers for each of the 11 evaluations per network dominated the CPU time);
  the train loader keeps its 4 workers (its augmentation draws and lru_cache live in them);
- itm_eval: wrapped to also record lors-bench's metrics under both tie rules on the SAME score
  matrices; it returns the authors' own result unchanged.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import numpy as np
import torch

RECORD: dict[str, list] = {"wandb": [], "itm_eval": []}


def _cpu(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _patch_cuda() -> None:
    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def t_to(self, *args, **kwargs):
        args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    def m_to(self, *args, **kwargs):
        args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return module_to(self, *args, **kwargs)

    tensor_cpu = torch.Tensor.cpu

    def t_cpu(self, *args, **kwargs):
        return self.clone() if self.device.type == "cpu" else tensor_cpu(self, *args, **kwargs)

    torch.Tensor.to, torch.nn.Module.to, torch.Tensor.cpu = t_to, m_to, t_cpu


def _wandb() -> types.ModuleType:
    mod = types.ModuleType("wandb")

    def init(*args, **kwargs):
        mod.run = types.SimpleNamespace(name=str(kwargs.get("name") or "run"))
        return mod.run

    def log(data, step=None, **kwargs):
        RECORD["wandb"].append({"step": step, **{k: float(v) for k, v in data.items()
                                                 if isinstance(v, (int, float, np.floating, np.integer))}})

    mod.init, mod.log, mod.finish = init, log, lambda *a, **k: None
    mod.run = types.SimpleNamespace(name="run")
    for name in ("Image", "Html", "Histogram"):
        setattr(mod, name, lambda *a, **k: None)
    return mod


def _text_model(path: str):
    from transformers import BertModel, BertTokenizer

    if not hasattr(BertTokenizer, "batch_encode_plus"):  # removed in transformers 5: the same call
        BertTokenizer.batch_encode_plus = lambda self, texts, **kwargs: self(texts, **kwargs)
    return BertModel.from_pretrained(path), BertTokenizer.from_pretrained(path)


def install(authors_repo: str, text_model_path: str, text_dim: int, image_dim: int, record_path: str) -> None:
    """Install every shim, then import the authors' modules that need patching; what they log is
    written to `record_path` after every evaluation (a run stopped midway keeps its evaluations)."""
    sys.path.insert(0, authors_repo)
    _patch_cuda()
    sys.modules["wandb"] = _wandb()
    sys.modules["clip"] = types.ModuleType("clip")
    sys.modules["kornia"] = types.ModuleType("kornia")
    try:
        import scipy.ndimage.interpolation  # noqa: F401
    except ImportError:
        import scipy.ndimage
        sys.modules["scipy.ndimage.interpolation"] = scipy.ndimage

    import timm
    create_model = timm.create_model
    timm.create_model = lambda name, *args, pretrained=False, **kwargs: create_model(name, *args, pretrained=False,
                                                                                      **kwargs)

    from src import epoch as authors_epoch
    from src import networks
    import data as authors_data
    from data.flickr30k_dataset import flickr30k_retrieval_eval

    loader = authors_data.DataLoader

    def eval_loader(dataset, *args, **kwargs):
        if isinstance(dataset, flickr30k_retrieval_eval):
            kwargs["num_workers"] = 0
        return loader(dataset, *args, **kwargs)

    authors_data.DataLoader = eval_loader

    networks.get_bert_stuff = lambda: _text_model(text_model_path)
    head = networks.ProjectionHead
    sizes = {768: text_dim, 1000: image_dim, 2304: image_dim}
    networks.ProjectionHead = lambda embedding_dim, projection_dim=768, dropout=0.1: head(
        sizes.get(embedding_dim, embedding_dim), sizes.get(projection_dim, projection_dim), dropout)

    itm_eval = authors_epoch.itm_eval

    def recorded_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
        result = itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)
        RECORD["itm_eval"].append({"authors": {k: float(v) for k, v in result.items()},
                                   **both_rules(scores_i2t, scores_t2i, txt2img)})
        with open(record_path, "w") as fh:
            json.dump(RECORD, fh)
        return result

    authors_epoch.itm_eval = recorded_itm_eval


def both_rules(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict) -> dict[str, dict[str, float]]:
    """lors-bench's metrics under each tie rule: TR from the authors' image rows, IR from their text rows."""
    from lors.retrieval import TIE_RULES, metrics_by_rule

    t2i = torch.tensor([txt2img[j] for j in range(len(txt2img))])
    by_tr = metrics_by_rule(torch.from_numpy(scores_i2t), t2i)
    by_ir = metrics_by_rule(torch.from_numpy(scores_t2i).T, t2i)
    out = {}
    for rule in TIE_RULES:
        tr, ir = by_tr[rule], by_ir[rule]
        out[rule] = {**{k: ir[k] for k in ("ir1", "ir5", "ir10", "ir_mean")},
                     **{k: tr[k] for k in ("tr1", "tr5", "tr10", "tr_mean")}}
        out[rule]["r_mean"] = (out[rule]["ir_mean"] + out[rule]["tr_mean"]) / 2
    return out
