"""Training engines, built in one place from the recipe's `engine` and `optim` slices.

`build_engine` picks the implementation (`resolve_backend`): `TrainEngine`, DeepSpeed ZeRO 0-3, whose
whole JSON config `deepspeed_config()` derives from the recipe (never written by hand); or
`trainers.torch_engine.TorchEngine`, plain data parallel, where ZeRO would shard nothing. The loops
only call `train_step`, `save` and `load` and read `model` (what the loss calls), `inference_model`
(what samplers call) and `module` (the weights).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from nuance.trainers.config import EngineBackend, EngineConfig, OptimConfig


def resolve_backend(engine: EngineConfig, *, world_size: int, cuda: bool) -> EngineBackend:
    """`engine.backend`, with `auto` resolved: ddp on GPUs when ZeRO would shard nothing (one worker, or
    ZeRO stage 0) and nothing is offloaded; deepspeed otherwise, and on CPUs."""
    if engine.backend != EngineBackend.auto:
        return engine.backend
    offload = engine.offload_optimizer or engine.offload_params
    if cuda and not offload and (world_size == 1 or engine.zero_stage == 0):
        return EngineBackend.ddp
    return EngineBackend.deepspeed


def build_engine(
    module: nn.Module,
    engine: EngineConfig,
    optim: OptimConfig,
    *,
    micro_batch: int,
    world_size: int,
    total_steps: int,
    trainable_only: bool = False,
):
    """The engine for `module` (already on its device). `trainable_only`: checkpoints hold only the
    `requires_grad` parameters (LoRA adapters; the frozen base is rebuilt from `model.pretrained`)."""
    cuda = next(module.parameters()).device.type == "cuda"
    sizes = {"micro_batch": micro_batch, "world_size": world_size, "total_steps": total_steps}
    if resolve_backend(engine, world_size=world_size, cuda=cuda) == EngineBackend.ddp:
        from nuance.trainers.torch_engine import TorchEngine

        return TorchEngine(module, engine, optim, trainable_only=trainable_only, **sizes)
    cls = AdapterEngine if trainable_only else TrainEngine
    return cls(module, engine, optim, **sizes)


def adamw_with_schedule(model: nn.Module, optim: OptimConfig, total_steps: int, *, fused: bool):
    """torch's AdamW over the trainable parameters (fused on GPUs) and its warmup / decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
        fused=fused or None,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim, total_steps)
    )
    return optimizer, scheduler


def ensure_deepspeed_accelerator() -> None:
    """DeepSpeed picks its accelerator at import: say 'cpu' explicitly on machines without CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def global_batch_size(micro_batch: int, micro_batches: int, world_size: int) -> int:
    return micro_batch * micro_batches * world_size


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, *, micro_batch: int, world_size: int) -> dict:
    """DeepSpeed's config dict, derived from the recipe. Batch identity: global = micro x accum x world."""
    zero: dict = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if engine.offload_ratio < 1:
            zero["offload_optimizer"]["ratio"] = engine.offload_ratio
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.micro_batches,
        "train_batch_size": global_batch_size(micro_batch, engine.micro_batches, world_size),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16", **_bf16_master(engine)},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # We pass the optimizer (TrainEngine: DeepSpeed's CPU Adam where the offloaded step runs on a
        # GPU host, torch's AdamW elsewhere, e.g. CPU tests, sparing them minutes of JIT build).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    return config


def _bf16_master(engine: EngineConfig) -> dict:
    """bf16 master weights, gradients and Adam moments of the offloaded optimizer (engine.master_weights)."""
    if engine.master_weights != "bf16":
        return {}
    return {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def uses_cpu_adam(engine: EngineConfig) -> bool:
    """DeepSpeed's CPU Adam (AVX, JIT-built once per machine) runs the offloaded optimizer step on GPU
    hosts, where it is many times faster than torch's AdamW; DeepSpeed also requires it for a partial
    offload or bf16 master weights. CPU-only runs keep torch's AdamW (no JIT build in the tests)."""
    if not engine.offload_optimizer:
        return False
    return torch.cuda.is_available() or engine.offload_ratio < 1 or engine.master_weights == "bf16"


def cpu_adam_with_schedule(model: nn.Module, engine: EngineConfig, optim: OptimConfig, total_steps: int):
    """DeepSpeed's CPU Adam (decoupled weight decay, as AdamW) over the trainable parameters, and the
    warmup / decay schedule."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
        adamw_mode=True, fp32_optimizer_states=engine.master_weights != "bf16",
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim, total_steps)
    )
    return optimizer, scheduler


def lr_multiplier(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1, then constant / linear / cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    shape = 1.0 - progress if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


@dataclass
class StepStats:
    """Per-step results, kept on the device: reading them forces a host-device sync, so the loop
    reads them only on log steps (an H100/H200 profile showed the engine host-bound)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None
    lr: float

    def as_floats(self) -> tuple[float, float]:
        grad_norm = float("nan") if self.grad_norm is None else float(self.grad_norm)
        return float(self.loss), grad_norm


class TrainEngine:
    """A DeepSpeed data-parallel (ZeRO 0-3) engine around one module."""

    backend = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        engine: EngineConfig,
        optim: OptimConfig,
        *,
        micro_batch: int,
        world_size: int,
        total_steps: int,
    ):
        ensure_deepspeed_accelerator()
        import deepspeed

        if uses_cpu_adam(engine):
            optimizer, scheduler = cpu_adam_with_schedule(model, engine, optim, total_steps)
        else:
            fused = torch.cuda.is_available() and not engine.offload_optimizer
            optimizer, scheduler = adamw_with_schedule(model, optim, total_steps, fused=fused)
        self.config = deepspeed_config(engine, optim, micro_batch=micro_batch, world_size=world_size)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )
        if engine.compile:
            self.ds.compile()
        self.micro_batches = engine.micro_batches

    @property
    def module(self) -> nn.Module:
        """The wrapped model (parameters partitioned under ZeRO-3)."""
        return self.ds.module

    @property
    def model(self):
        """What loss functions and samplers call: the DeepSpeed engine (it gathers ZeRO-3 weights)."""
        return self.ds

    inference_model = model

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def train_step(
        self, micro_batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor]
    ) -> StepStats:
        """One optimizer step over `micro_batches` micro batches; `loss_fn(engine, micro_batch) -> loss`."""
        losses = []
        for micro_batch in micro_batches:
            loss = loss_fn(self.ds, micro_batch)
            self.ds.backward(loss)
            self.ds.step()
            losses.append(loss.detach())
        assert len(losses) == self.micro_batches, "one train_step consumes exactly engine.micro_batches"
        return StepStats(
            loss=torch.stack(losses).mean(),
            grad_norm=self.ds.get_global_grad_norm(),
            lr=self.scheduler.get_last_lr()[0],
        )

    def save(self, directory: str, client_state: dict | None = None) -> None:
        """Every rank calls this: model / optimizer / scheduler shards as DeepSpeed writes them."""
        self.ds.save_checkpoint(directory, tag="state", client_state=client_state or {})

    def load(self, directory: str) -> dict:
        _, client_state = self.ds.load_checkpoint(directory, tag="state")
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        return client_state

    def local_param_numel(self) -> tuple[int, int]:
        """(elements this rank stores, elements of the full model): ZeRO-3 stores about 1/world."""
        local = total = 0
        for p in self.ds.module.parameters():
            full = getattr(p, "ds_numel", p.numel())
            total += full
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return local, total


class AdapterEngine(TrainEngine):
    """A TrainEngine whose checkpoints hold the trainable parameters (LoRA adapters), their optimizer
    state and the LR schedule, not the frozen base (GBs for SDXL, and 4-bit NF4 state under QLoRA): the
    loop rebuilds the base from `model.pretrained` deterministically before loading."""

    def save(self, directory: str, client_state: dict | None = None) -> None:
        self.ds.save_checkpoint(
            directory, tag="state", client_state=client_state or {}, exclude_frozen_parameters=True
        )

    def load(self, directory: str) -> dict:
        # The saved module state has no base weights: load the trainable ones only, and insist on all.
        _, client_state = self.ds.load_checkpoint(
            directory, tag="state", custom_load_fn=lambda src, dst: load_trainable(dst, src)
        )
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        return client_state


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the `requires_grad` parameters from a state dict in the module's own naming; every one of
    them must be there."""
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{len(missing)} trainable weights missing from the checkpoint, e.g. {missing[:2]}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name])
