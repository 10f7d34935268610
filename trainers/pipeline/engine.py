"""`PipelineEngine`: DeepSpeed pipeline parallelism (PipelineModule + PipelineEngine, ZeRO 0/1) of a
backbone, data parallel x pipeline parallel over the run's workers.

Topology (DeepSpeed's `PipeDataParallelTopology`, axes pipe then data): rank = stage x dp + dp_rank, so
the data-parallel replicas of a stage are neighbouring ranks (one node), and the pipeline crosses nodes,
where only activations of one micro batch travel. One optimizer step is `train_batch` over
`engine.micro_batches` micro batches (1F1B schedule); the first stage draws noise / timesteps and builds
the input tuples (`prepare`), the target rides in the tuple to the last stage, whose loss DeepSpeed
averages over the micro batches and the data-parallel replicas.

Each rank builds the whole backbone once, keeps the parameters of its stage on the device and frees the
rest; rank 0 keeps a whole copy in host memory (`inference_model`, on the device only from `gather_full`
to `park_full`) that `gather_full` fills with the current (EMA) weights of every
stage for sample grids and for the checkpoints' whole-model files (`checkpoint.PIPELINE_FULL`), from
which `nuance export` writes one normal diffusers folder.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch import nn

from nuance.trainers.checkpoint import PIPELINE_FULL
from nuance.trainers.config import EngineConfig, OptimConfig
from nuance.trainers.diffusion.objectives import _mse
from nuance.trainers.engine import (
    StepStats,
    adamw_with_schedule,
    deepspeed_config,
    ensure_deepspeed_accelerator,
)
from nuance.trainers.models.backbone import Backbone
from nuance.trainers.pipeline.layers import pipeline_layers, unbits


def pipe_loss(outputs: tuple, _labels) -> torch.Tensor:
    """The objective's MSE between the last layer's prediction and the target carried in the tuple."""
    prediction, target_bits = outputs
    return _mse(prediction, unbits(target_bits))  # the objectives' own MSE: the same loss as PP=1


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class Pipe(PipelineModule):
        """PipelineModule that also takes a manual list of stage boundaries."""

        def __init__(self, layers, boundaries: list[int] | None, **kwargs):
            self._boundaries = boundaries
            super().__init__(layers, **kwargs)

        def _partition_layers(self, method="uniform"):
            if self._boundaries is None:
                return super()._partition_layers(method)
            self.parts = list(self._boundaries)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return Pipe


class PipelineEngine:
    """The loops' engine interface (`train_step`, `save`, `load`, `module`, `inference_model`) over a
    DeepSpeed pipeline."""

    backend = "pipeline"

    def __init__(
        self,
        backbone: Backbone,
        engine: EngineConfig,
        optim: OptimConfig,
        *,
        micro_batch: int,
        world_size: int,
        total_steps: int,
        activation_checkpointing: bool = False,
    ):
        ensure_deepspeed_accelerator()
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group
        stages = engine.pipeline_stages
        self.dp_world = world_size // stages
        rank = dist.get_rank()
        self.stage, self.dp_rank = divmod(rank, self.dp_world)
        self.num_stages, self.micro_batches = stages, engine.micro_batches
        if getattr(backbone.net, "is_gradient_checkpointing", False):  # the pipeline checkpoints per layer
            backbone.net.disable_gradient_checkpointing()  # instead (diffusers' blocks would recompute twice)
        backbone.cpu()  # the PipelineModule moves only its own stage to the device
        self.full = copy.deepcopy(backbone) if rank == 0 else None  # host memory between gathers
        self.full_state: dict | None = None
        partition = engine.pipeline_partition
        boundaries = None if isinstance(partition, str) else list(partition)
        module = _pipeline_module_class()(
            pipeline_layers(backbone),
            boundaries,
            topology=PipeDataParallelTopology(num_pp=stages, num_dp=self.dp_world),
            loss_fn=pipe_loss,
            partition_method=partition if isinstance(partition, str) else "uniform",
            # per-layer activation checkpointing (torch's non-reentrant: inputs need no requires_grad)
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            activation_checkpoint_func=functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False
            ),
        )
        self.parts = [int(b) for b in module.parts]
        owner = {id(p): name for name, p in backbone.named_parameters()}
        local = {id(p) for p in module.parameters()}
        self.local_names = {name: owner[id(p)] for name, p in module.named_parameters()}
        with torch.no_grad():  # free what other stages own (rank 0 keeps its whole copy in `full`)
            for p in backbone.parameters():
                if id(p) not in local:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        fused = torch.cuda.is_available() and not engine.offload_optimizer
        optimizer, scheduler = adamw_with_schedule(module, optim, total_steps, fused=fused)
        self.config = deepspeed_config(engine, optim, micro_batch=micro_batch, world_size=self.dp_world)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            dist_init_required=False,
        )

    @property
    def module(self) -> nn.Module:
        """This stage's layers (their parameters are the backbone's, named by layer index)."""
        return self.ds.module

    @property
    def model(self):
        return self.ds

    @property
    def inference_model(self) -> Backbone:
        """Rank 0's whole backbone, as of the last `gather_full` (EMA weights when there is an EMA)."""
        assert self.full is not None, "only rank 0 holds the whole model"
        return self.full

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    def train_step(self, micro_batches: Iterable, prepare: Callable[[dict], tuple]) -> StepStats:
        """One optimizer step over `micro_batches` micro batches. `prepare(batch) -> input tuple` runs on
        the first stage only (it draws the noise); the others need only the count."""
        batches = list(micro_batches)
        assert len(batches) == self.micro_batches, "one train_step consumes exactly micro_batches batches"
        label = torch.zeros(1)
        if self.is_first_stage:
            items = [(prepare(b), label) for b in batches]
        else:
            items = [(None, label)] * len(batches)
        loss = self.ds.train_batch(data_iter=iter(items))
        return StepStats(
            loss=loss, grad_norm=self.ds.get_global_grad_norm(), lr=self.scheduler.get_last_lr()[0]
        )

    @torch.no_grad()
    def gather_full(self, ema=None) -> None:
        """Every rank calls it: rank 0 collects each stage's weights (and EMA shadow) in the backbone's
        names, loads them into `inference_model` (EMA if any) and keeps both for `save`."""
        mine: dict = {"model": {}, "ema": {}}
        if self.dp_rank == 0:
            params = dict(self.module.named_parameters())
            mine["model"] = {self.local_names[n]: p.detach().float().cpu() for n, p in params.items()}
            if ema is not None:
                mine["ema"] = {self.local_names[n]: t.detach().cpu() for n, t in ema.shadow.items()}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return
        model = {k: v for part in parts for k, v in part["model"].items()}
        ema_state = {k: v for part in parts for k, v in part["ema"].items()}
        full = self.inference_model
        full.load_state_dict({**full.state_dict(), **model})
        raw = {k: v.detach().clone() for k, v in full.state_dict().items()}  # loading the EMA overwrites
        self.full_state = {"model": raw, "ema": ema_state}
        if ema_state:
            full.load_state_dict({**full.state_dict(), **ema_state})
        full.to(self.device)  # for the sample grid; `park_full` returns it to host memory

    def park_full(self) -> None:
        """Rank 0: move the whole-model copy back to host memory (the device keeps only the stage)."""
        if self.full is not None:
            self.full.cpu()

    def save(self, directory: str, client_state: dict | None = None) -> None:
        """Every rank: DeepSpeed's per-layer and optimizer files; rank 0 also the whole model (and EMA)
        as of the last `gather_full`, for export (`checkpoint.model_state_dict`)."""
        self.ds.save_checkpoint(directory, tag="state", client_state=client_state or {})
        for kind, state in (self.full_state or {}).items():
            if state:
                tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
                save_file(tensors, str(Path(directory) / "state" / PIPELINE_FULL[kind]))

    def load(self, directory: str) -> dict:
        _, client_state = self.ds.load_checkpoint(directory, tag="state")
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed pipeline checkpoint under {directory}")
        return client_state
