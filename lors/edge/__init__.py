"""EDGE (Zhao et al., NeurIPS 2025): generative multimodal distillation with a fine-tuned diffusion model.

Three phases, each resumable and seeded: `finetune` (bias and norm parameters of a Stable Diffusion
UNet trained with a contrastive + diversity loss on CLIP features), `sample` (one image per training
caption drawn as prompt) and `captions` (optional extra captions from a vision-language model).
`lors.distill.edge` turns their output into the suite's synthetic-set format.
"""
