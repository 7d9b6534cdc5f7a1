"""Typed, validated parameters (params.yaml).

Every knob of the suite lives here, so a typo in params.yaml is an error at load time rather than a
silently ignored key three hours into a run. Sections mirror the pipeline stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lors.errors import ConfigError
from lors.io import slug


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


DatasetKind = Literal["embedded", "flickr30k", "coco", "flickr8k"]


class EmbeddedConfig(Strict):
    """Knobs of the generated default dataset (lors.data.embedded)."""

    n_train: int = Field(2000, ge=10)
    n_val: int = Field(500, ge=10)
    n_test: int = Field(500, ge=10)
    captions_per_image: int = Field(5, ge=1)
    seed: int = 0


class DatasetConfig(Strict):
    kind: DatasetKind
    root: Path | None = None  # image root (Karpathy layouts) or the Flickr8k release folder
    ann_root: Path | None = None  # folder with the Karpathy json files (defaults to root)
    image_size: int = Field(224, ge=8)
    skip_bad_images: bool = False  # skip (and count) missing/corrupt images instead of failing
    download_annotations: bool = True  # fetch missing Karpathy json files when online
    embedded: EmbeddedConfig = EmbeddedConfig()


class TextEncoderConfig(Strict):
    """Frozen text encoder whose feature space the synthetic texts live in."""

    name: str = "bert-base-uncased"  # any transformers name or local path; "minilm" = bundled offline model
    pooling: Literal["cls", "mean"] = "cls"
    max_words: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)


class ModelConfig(Strict):
    image_encoder: str = "nfnet_l0"  # any timm name
    pretrained: bool = True
    temperature: float = Field(0.07, gt=0)
    text_head_dropout: float = Field(0.1, ge=0, lt=1)


class ExpertsConfig(Strict):
    num_experts: int = Field(20, ge=1)
    epochs: int | None = None  # None: the largest max_start_epoch + expert_epochs among distill settings
    keep_all_epochs: bool = False  # train and keep `full_epochs` epochs (the reference's full buffer)
    full_epochs: int = Field(10, ge=1)
    lr_img: float = Field(0.1, gt=0)
    lr_txt: float = Field(0.1, gt=0)
    batch_size: int = Field(128, ge=1)
    augment: bool = True
    eval_every: int = Field(0, ge=0)  # 0: evaluate retrieval only at the end of each expert
    amp: bool = False  # bf16 autocast on GPU
    channels_last: bool = False


class DistillSetting(Strict):
    """Hyper-parameters of one (dataset, budget) distillation, method.md 3.1."""

    lr_img: float = 1000.0
    lr_txt: float = 1000.0
    lr_sim: float = 10.0
    lr_lr: float = 1e-2
    rank: int = Field(10, ge=1)
    alpha: float = 1.0
    mini_batch: int = Field(20, ge=1)
    syn_steps: int = Field(8, ge=1)
    expert_epochs: int = Field(1, ge=1)
    max_start_epoch: int = Field(2, ge=1)
    temperature: float = Field(0.07, gt=0)
    merge_branches: bool = False
    no_aug: bool = False
    iterations: int = Field(3000, ge=0)
    eval_every: int = Field(50, ge=0)  # 0: no evaluation hook during distillation
    momentum: float = 0.5
    init_lr: float = 0.1  # initial learnable inner-loop lrs (= expert lr)
    init: Literal["real", "noise"] = "real"
    loss: Literal["wbce", "bce", "ence"] = "wbce"
    similarity: Literal["lowrank", "full"] = "lowrank"
    mtt_mini_batch: int | None = Field(None, ge=1)  # MTT-VL pairs per unrolled step; None = all (method.md 3.7)


class DistillConfig(Strict):
    checkpoint_every: int = Field(50, ge=1)
    # settings[dataset][budget]; a missing entry falls back to `default`
    default: DistillSetting = DistillSetting()
    settings: dict[str, dict[int, DistillSetting]] = {}

    def setting(self, dataset: str, budget: int) -> DistillSetting:
        return self.settings.get(dataset, {}).get(budget, self.default)


class SelectConfig(Strict):
    expert_index: int = 0  # which expert provides the embeddings for feature-based selectors
    vas_clip_fraction: float = Field(0.5, gt=0, le=1)  # CLIP-score filter kept before VAS ranking


class EvaluateConfig(Strict):
    num_eval: int = Field(5, ge=1)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = Field(10, ge=1)
    text_transfer: Literal["reference", "nearest_caption"] = "reference"
    amp: bool = True  # bf16 autocast for test encoding on GPU
    loss: Literal["wbce", "bce", "ence"] = "wbce"  # soft contrastive loss against the set's similarity
    whole_epochs: int = Field(10, ge=1)  # "whole dataset" upper bound: expert-recipe epochs on the train split
    # tied scores in recall@K (lors.retrieval): auto = the authors' argsort order under `protocol: reference`,
    # pessimistic (ties count against the query) under clean; records carry the other rule's numbers too
    ties: Literal["auto", "pessimistic", "argsort"] = "auto"

    def tie_rule(self, protocol: str) -> Literal["pessimistic", "argsort"]:
        if self.ties != "auto":
            return self.ties
        return "argsort" if protocol == "reference" else "pessimistic"


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"  # overridden by MLFLOW_TRACKING_URI
    experiment: str = "lors-bench"
    enabled: bool = True
    defer: bool = True  # record runs on disk; the report stage or `lors-bench track` writes them to MLflow


class ReportConfig(Strict):
    """What `lors-bench report` compares and how it flags a reproduction."""

    published: Path = Path("reports/published.csv")  # columns dataset,budget,method,metric,value,std,source
    selection: Literal["auto", "best", "last", "val"] = "auto"  # auto: best (reference), val or last (clean)
    sigma: float = Field(2.0, gt=0)  # flag |reproduced - published| > sigma * std


class GridConfig(Strict):
    """What one `dvc repro` runs: the matrix of the pipeline stages."""

    datasets: list[str]
    distill_methods: list[str] = ["lors", "tesla_vl", "mtt_vl"]
    distill_budgets: list[int] = [100, 200, 500]
    select_methods: list[str] = ["random", "herding", "kcenter", "forgetting", "vas", "clip_score"]
    select_budgets: list[int] = [100, 200, 500, 1000]
    archs: list[str] = []  # cross-architecture "image+text" pairs evaluated on top of the source one
    cross_methods: list[str] = ["lors"]  # distillation methods evaluated on every entry of `archs`

    @field_validator("archs")
    @classmethod
    def _archs_are_file_names(cls, archs: list[str]) -> list[str]:
        # each arch names its result file in dvc.yaml, so it must be a plain file name
        for arch in archs:
            if slug(arch) != arch:
                raise ValueError(f"'{arch}' is not a plain file name (use letters, digits, - _ . +; "
                                 "a local model path or :pooling suffix works with `lors-bench evaluate --arch`)")
        return archs


class Params(Strict):
    profile: str = "demo"
    seed: int = 0
    protocol: Literal["reference", "clean"] = "reference"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    work_dir: Path = Path("work")
    grid: GridConfig
    datasets: dict[str, DatasetConfig]
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    model: ModelConfig = ModelConfig()
    experts: ExpertsConfig = ExpertsConfig()
    distill: DistillConfig = DistillConfig()
    select: SelectConfig = SelectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _grid_names_known(self) -> "Params":
        for name in self.grid.datasets:
            if name not in self.datasets:
                raise ValueError(f"grid.datasets names '{name}', which is not a key of datasets")
        return self

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset '{name}' (params know: {', '.join(sorted(self.datasets))})")
        return self.datasets[name]

    def expert_epochs_needed(self, dataset: str) -> int:
        """Expert epochs distillation reads: start epochs are 0..max_start_epoch-1 and targets lie
        expert_epochs later, so snapshots 0..max(max_start_epoch - 1 + expert_epochs) suffice."""
        if self.experts.keep_all_epochs:
            return self.experts.full_epochs
        if self.experts.epochs is not None:
            return self.experts.epochs
        settings = [self.distill.default, *self.distill.settings.get(dataset, {}).values()]
        return max(s.max_start_epoch - 1 + s.expert_epochs for s in settings)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; any problem becomes one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<top>"
        raise ConfigError(f"{path}: {key}: {err['msg']}") from exc
