"""Phase 3 (optional): extra captions for each generated image from a vision-language model.

As `caption_synthesis_llava.py`: with CPI captions per image, the prompt caption is kept and the VLM
adds CPI - 1 more, asked "Describe the image in one sentence." (CPI = 2) or "Describe the image briefly
in {CPI - 1} different ways." (CPI > 2, one caption per line, leading enumerators removed). Each image
then appears once per caption, so B pairs = images x CPI. Decoding is greedy, hence deterministic
(the authors' LLaVA CLI samples at its default temperature). A reply with fewer captions than asked
is completed with the prompt caption, and counted.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lors.edge.finetune import Store
from lors.hub import load_pretrained

log = logging.getLogger(__name__)
PHASE = "edge-captions"
CHECKPOINT_EVERY = 16
Describe = Callable[[torch.Tensor, str], str]  # (uint8 (3, H, W) image, instruction) -> reply text
ENUMERATOR = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")


def instruction(n_new: int) -> str:
    if n_new == 1:
        return "Describe the image in one sentence."
    return f"Describe the image briefly in {n_new} different ways."


def parse_reply(reply: str, n_new: int) -> list[str]:
    """The first `n_new` non-empty lines of a reply, without list markers."""
    lines = [ENUMERATOR.sub("", line).strip() for line in reply.splitlines()]
    return [line for line in lines if line][:n_new]


def synthesise_captions(describe: Describe, images: torch.Tensor, prompts: Sequence[str], cpi: int,
                        store: Store) -> dict[str, Any]:
    """Per image: [prompt, VLM caption 1, ..., VLM caption cpi-1]. Returns {'captions', 'short', 'seconds'}."""
    state = store.load(PHASE) or {"captions": [], "short": 0, "seconds": 0.0}
    start = time.perf_counter()
    for i in range(len(state["captions"]), len(images)):
        new = parse_reply(describe(images[i], instruction(cpi - 1)), cpi - 1)
        state["short"] += len(new) < cpi - 1
        state["captions"].append([prompts[i], *new, *[prompts[i]] * (cpi - 1 - len(new))])
        if (i + 1) % CHECKPOINT_EVERY == 0 or i + 1 == len(images):
            state["seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            store.save(PHASE, state)
    if state["short"]:
        log.warning("EDGE captions: %d replies had fewer than %d captions; completed with the prompt",
                    state["short"], cpi - 1)
    return state


def load_vlm(name: str, dtype: torch.dtype, device: torch.device, max_new_tokens: int) -> Describe:
    """A transformers image-text-to-text model (e.g. llava-hf/llava-1.5-7b-hf) answering greedily."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = load_pretrained("vlm", name, lambda n, local: AutoProcessor.from_pretrained(n, local_files_only=local))
    model = load_pretrained("vlm", name, lambda n, local: AutoModelForImageTextToText.from_pretrained(
        n, dtype=dtype, local_files_only=local)).to(device).eval()

    @torch.inference_mode()
    def describe(image: torch.Tensor, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        inputs = processor(images=picture, text=prompt, return_tensors="pt").to(device, dtype=dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return describe
