"""ZeRO-3 that never materialises the whole model on one rank.

Under `engine.zero_stage=3` (DeepSpeed backend) the backbone is constructed inside `deepspeed.zero.Init`:
every parameter is partitioned across the data-parallel ranks the moment its module is built, so a rank
holds about 1/world of the weights from the start (with `engine.offload_params`, in host memory).
Pretrained weights are then copied in one tensor at a time (`load_partitioned`): rank 0 reads that one
tensor from the folder's safetensors, `GatheredParameters` briefly assembles that one parameter, and it
is partitioned again. At no point does any rank hold more than its shard plus one parameter.

FLOPs of a partitioned model are counted on a meta-device copy of the same architecture
(`meta_copy`): FlopCounterMode counts shapes, and meta tensors have shapes without storage.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nuance.trainers.config import EngineBackend, EngineConfig, OptimConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def partitions_at_init(engine: EngineConfig, *, world_size: int, cuda: bool) -> bool:
    """True when the engine will be DeepSpeed ZeRO-3: then modules are built partitioned."""
    from nuance.trainers.engine import resolve_backend

    backend = resolve_backend(engine, world_size=world_size, cuda=cuda)
    return backend == EngineBackend.deepspeed and engine.zero_stage == 3


@contextlib.contextmanager
def partitioned_init(
    engine: EngineConfig, optim: OptimConfig, *, micro_batch: int, world_size: int, device: torch.device
) -> Iterator[None]:
    """Modules built inside are partitioned at construction (ZeRO-3), else this does nothing."""
    if not partitions_at_init(engine, world_size=world_size, cuda=device.type == "cuda"):
        yield
        return
    import deepspeed

    from nuance.trainers.engine import deepspeed_config, ensure_deepspeed_accelerator

    ensure_deepspeed_accelerator()
    if torch.distributed.is_initialized():  # Ray Train's process group: DeepSpeed adopts it (else it
        # would look for launcher variables or MPI)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    config = deepspeed_config(engine, optim, micro_batch=micro_batch, world_size=world_size)
    # zero.Init reads only the ZeRO and precision sections; DeepSpeed derives the global batch from the
    # micro batch itself here (its world size is not set up before deepspeed.initialize).
    config.pop("train_batch_size")
    with deepspeed.zero.Init(
        config_dict_or_path=config,
        remote_device="cpu" if engine.offload_params else None,  # None: the accelerator's memory
        pin_memory=engine.offload_params and device.type == "cuda",
    ):
        yield


def is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file that holds it (single file or sharded with an index)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX} (safetensors weights needed)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


@torch.no_grad()
def load_partitioned(net: nn.Module, folder: str | os.PathLike, *, rank: int) -> None:
    """Copy a diffusers folder's weights into `net`, whose parameters are ZeRO-3 partitioned: one
    parameter (or buffer) at a time, read by rank 0 only; every weight of `net` must be in the folder."""
    import deepspeed
    from safetensors import safe_open

    files = _tensor_files(Path(folder))
    own = dict(net.named_parameters())
    missing = sorted(set(own) - set(files))
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weights missing, e.g. {missing[:2]}")
    handles: dict[Path, object] = {}
    try:
        for name, param in own.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    path = files[name]
                    if path not in handles:
                        handles[path] = safe_open(str(path), framework="pt").__enter__()
                    param.copy_(handles[path].get_tensor(name).to(param.dtype))
        for name, buf in net.named_buffers():  # buffers are not partitioned: every rank reads them
            if name in files:
                with safe_open(str(files[name]), framework="pt") as f:
                    buf.copy_(f.get_tensor(name).to(buf.dtype))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def meta_copy(net: nn.Module) -> nn.Module:
    """The same diffusers architecture with storage-less (meta) parameters, for counting FLOPs."""
    with torch.device("meta"):
        return type(net).from_config(net.config)
