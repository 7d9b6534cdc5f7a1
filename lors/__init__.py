"""lors-bench: a reproducibility benchmark suite for multimodal dataset distillation (LoRS)."""
