"""Data-parallel training without DeepSpeed (`engine.backend=ddp`), for runs where ZeRO shards nothing.

On one GPU, or when the model and its optimizer fit on every GPU, ZeRO's per-parameter hooks and flat
buffers cost time and buy no memory (DESIGN.md: 2.64x measured elsewhere from ZeRO-2 -> DDP). This
engine is what a careful plain loop does: fp32 weights, the forward under `torch.autocast` (bf16 /
fp16 with a GradScaler), torch's fused AdamW, one foreach grad-norm per step, DDP's bucketed
all-reduce when there are several ranks (`no_sync` on all but the last micro batch), optionally
`torch.compile` over the module. Nothing in `train_step` waits for the GPU: the loss and grad norm stay
on the device until a log step reads them.

Checkpoints (rank 0 writes; every rank reads):

    state/mp_rank_00_model_states.pt   {"module": fp32 state dict}, the file DeepSpeed ZeRO 0-2 writes,
                                       so `checkpoint.model_state_dict` reads either engine's
    state/engine_states.pt             optimizer, LR schedule, grad scaler, client state

With `trainable_only` (LoRA) the module state holds only the `requires_grad` parameters: the frozen
base is rebuilt from `model.pretrained` before loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nuance.trainers.config import EngineConfig, OptimConfig
from nuance.trainers.engine import StepStats, adamw_with_schedule, load_trainable
from nuance.trainers.safe_load import torch_load

MODEL_FILE = "mp_rank_00_model_states.pt"
STATES_FILE = "engine_states.pt"
TAG = "state"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast:
    """Calls `fn` under torch.autocast; attribute access goes to the module (like DeepSpeed's engine)."""

    def __init__(self, fn: Callable, module: nn.Module, dtype: torch.dtype | None, device_type: str):
        self.fn, self.module, self.dtype, self.device_type = fn, module, dtype, device_type

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.fn(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


class TorchEngine:
    """fp32 weights + autocast + fused AdamW (+ DDP over the process group when world_size > 1)."""

    backend = "ddp"

    def __init__(
        self,
        model: nn.Module,
        engine: EngineConfig,
        optim: OptimConfig,
        *,
        micro_batch: int,
        world_size: int,
        total_steps: int,
        trainable_only: bool = False,
    ):
        self.module = model
        self.micro_batches = engine.micro_batches
        self.grad_clip = optim.grad_clip
        self.trainable_only = trainable_only
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.optimizer, self.scheduler = adamw_with_schedule(model, optim, total_steps, fused=cuda)
        self.params = self.optimizer.param_groups[0]["params"]  # the trainable ones
        dtype = AUTOCAST_DTYPES.get(str(engine.precision))
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None
        self.ddp = None
        forward: nn.Module = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.device] if cuda else None)
            forward = self.ddp
        if engine.compile:
            forward = torch.compile(forward)
        self.model = Autocast(forward, model, dtype, self.device.type)
        """What loss functions call: the (DDP-wrapped, compiled) module under autocast."""
        self.inference_model = Autocast(model, model, dtype, self.device.type)
        """What samplers call: the plain module under autocast (no recompiles for other batch sizes)."""

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(
        self, micro_batches: Iterable, loss_fn: Callable[[Callable, object], torch.Tensor]
    ) -> StepStats:
        """One optimizer step over `micro_batches` micro batches; `loss_fn(model, micro_batch) -> loss`."""
        micro_batches = list(micro_batches)
        assert len(micro_batches) == self.micro_batches, "a train_step consumes exactly engine.micro_batches"
        losses = []
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                loss = loss_fn(self.model, micro_batch)
                scaled = loss / self.micro_batches
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if self.grad_clip and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, grad_norm, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        lr = self.scheduler.get_last_lr()[0]
        return StepStats(loss=torch.stack(losses).mean(), grad_norm=grad_norm, lr=lr)

    # -- state ----------------------------------------------------------------------------------------
    def _module_state(self) -> dict[str, torch.Tensor]:
        if not self.trainable_only:
            return self.module.state_dict()
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, directory: str, client_state: dict | None = None) -> None:
        """Rank 0 writes the module and the optimizer (identical on every data-parallel rank)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        out = Path(directory) / TAG
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self._module_state()}, out / MODEL_FILE)
        states = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "client_state": client_state or {},
        }
        torch.save(states, out / STATES_FILE)

    def load(self, directory: str) -> dict:
        path = Path(directory) / TAG
        if not (path / STATES_FILE).is_file():
            raise FileNotFoundError(
                f"no torch-engine checkpoint under {directory} (written by engine.backend=deepspeed? "
                f"resume with the backend that wrote it)"
            )
        module = torch_load(path / MODEL_FILE, map_location=self.device)["module"]  # tensors only
        self._load_module(module)
        states = torch_load(path / STATES_FILE, map_location=self.device)
        self.optimizer.load_state_dict(states["optimizer"])
        self.scheduler.load_state_dict(states["scheduler"])
        if self.scaler and states["scaler"]:
            self.scaler.load_state_dict(states["scaler"])
        return states["client_state"]

    def _load_module(self, state: dict[str, torch.Tensor]) -> None:
        if self.trainable_only:
            load_trainable(self.module, state)
        else:
            self.module.load_state_dict(state)

    def local_param_numel(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.module.parameters())
        return total, total
