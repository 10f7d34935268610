"""DeepSpeed engine over 2 gloo processes: ZeRO-3 really partitions; save/load continues bit-exactly.

Also the pure pieces: the DeepSpeed config derived from the recipe, and the LR schedule.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from nuance.trainers.config import EngineConfig, OptimConfig
from nuance.trainers.engine import deepspeed_config, lr_multiplier
from tests.conftest import free_port


def test_deepspeed_config_is_derived_from_the_recipe():
    cfg = deepspeed_config(
        EngineConfig(
            zero_stage=3, precision="bf16", micro_batches=4, offload_optimizer=True, offload_params=True
        ),
        OptimConfig(grad_clip=0.5),
        micro_batch=8,
        world_size=16,
    )
    assert cfg["train_batch_size"] == 8 * 4 * 16  # global = micro x accumulation x data-parallel world
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    plain = deepspeed_config(EngineConfig(zero_stage=0), OptimConfig(), micro_batch=2, world_size=1)
    assert "offload_optimizer" not in plain["zero_optimization"] and not plain["bf16"]["enabled"]


def test_backend_auto_picks_ddp_only_where_zero_shards_nothing():
    from nuance.trainers.engine import resolve_backend

    def pick(world_size, cuda=True, **engine):
        return str(resolve_backend(EngineConfig(**engine), world_size=world_size, cuda=cuda))

    assert pick(1, zero_stage=2) == "ddp"  # one GPU: nothing to shard across
    assert pick(8, zero_stage=0) == "ddp"  # several GPUs, no sharding asked for
    assert pick(8, zero_stage=2) == "deepspeed"
    assert pick(1, zero_stage=2, offload_optimizer=True) == "deepspeed"  # offload is DeepSpeed's
    assert pick(1, cuda=False) == "deepspeed"  # CPU runs keep DeepSpeed (gloo)
    assert pick(8, zero_stage=3, backend="ddp") == "ddp"  # explicit wins
    with pytest.raises(ValueError, match="backend"):
        EngineConfig(backend="ddp", zero_stage=2, offload_optimizer=True)


def test_resume_with_the_other_engine_names_the_key(tmp_path):
    from types import SimpleNamespace

    from nuance.trainers import checkpoint

    meta = {"format": checkpoint.FORMAT, "step": 3, "world_size": 1, "zero_stage": 2, "engine": "deepspeed"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="written by the deepspeed engine .* set engine.backend=deepspeed"):
        checkpoint.load(tmp_path, engine=SimpleNamespace(backend="ddp"), ema=None, rank=0, world_size=1)


def test_lr_schedule_warmup_then_decay():
    optim = OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, optim, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, optim, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, optim, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, optim, 110) == pytest.approx(0.1)
    linear = OptimConfig(decay="linear")
    assert lr_multiplier(50, linear, 100) == pytest.approx(0.5)
    assert lr_multiplier(7, OptimConfig(), 100) == 1.0


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def _make_engine(stage: int, backend: str, offload: bool = False):
    from nuance.trainers.config import ModelConfig
    from nuance.trainers.engine import build_engine
    from nuance.trainers.models.backbone import build_backbone

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="dit_debug", num_classes=4), in_channels=3, sample_size=8)
    return build_engine(
        model,
        EngineConfig(zero_stage=stage, backend=backend, offload_optimizer=offload, offload_params=offload),
        OptimConfig(lr=1e-3, warmup_steps=2, decay="linear"),
        micro_batch=4,
        world_size=2,
        total_steps=10,
    )


def _steps(engine, rank: int, steps: range) -> list[float]:
    from nuance.trainers.diffusion import build_objective

    objective = build_objective("eps")
    losses = []
    for step in steps:
        x0, labels = _batch(rank, step)
        torch.manual_seed(1000 * rank + step)  # the objective's noise / timesteps
        stats = engine.train_step(
            [(x0, labels)], lambda m, b: objective.loss(m, b[0], {"class_labels": b[1]})
        )
        losses.append(stats.as_floats()[0])
    return losses


def _weights_digest(engine) -> float:
    return float(sum(p.double().sum() for p in engine.module.parameters() if not hasattr(p, "ds_id")))


def _worker(rank: int, port: int, stage: int, backend: str, offload: bool, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    engine = _make_engine(stage, backend, offload)
    assert engine.backend == backend
    local, total = engine.local_param_numel()
    straight = _steps(engine, rank, range(0, 2))
    engine.save(os.path.join(out_dir, "ckpt"))
    straight += _steps(engine, rank, range(2, 5))
    torch.distributed.barrier()

    digest = _weights_digest(engine)
    resumed_engine = _make_engine(
        stage, backend, offload
    )  # fresh weights and optimizer, then load step-2 state
    resumed_engine.load(os.path.join(out_dir, "ckpt"))
    resumed = _steps(resumed_engine, rank, range(2, 5))
    result = {"local": local, "total": total, "straight": straight, "resumed": resumed, "digest": digest}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
    # Leave without running C++ static destructors: at interpreter exit after ZeRO-3, a native thread
    # is sometimes destroyed while joinable ("terminate called without an active exception", SIGABRT;
    # 3 of 13 local runs, once in CI), after the results above were written.
    os._exit(0)


def run_two_ranks(tmp_path, stage: int, backend: str, offload: bool = False) -> list[dict]:
    args = (free_port(), stage, backend, offload, str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "stage", "offload"),
    [("deepspeed", 2, False), ("deepspeed", 3, False), ("deepspeed", 3, True), ("ddp", 0, False)],
)
def test_two_gloo_ranks_partition_and_resume_exactly(tmp_path, backend, stage, offload):
    """offload: ZeRO-3 with the optimizer state and the parameters in host memory (DeepSpeed's CPU
    offload; on a CPU-only machine the "device" is host memory too, so this checks the code path)."""
    results = run_two_ranks(tmp_path, stage, backend, offload)
    total = results[0]["total"]
    if stage != 3:  # gradients are averaged: both ranks hold the same full weights after each step
        assert results[0]["digest"] == results[1]["digest"]
    if stage == 3:
        for r in results:  # each rank holds about half of the elements (ZeRO-3 pads the last partition)
            assert 0.45 < r["local"] / total < 0.55, r
        assert sum(r["local"] for r in results) >= total
    else:
        assert all(r["local"] == total for r in results)  # ZeRO-2 keeps full weights on every rank
    for r in results:
        assert all(math.isfinite(x) for x in r["straight"])
        assert r["resumed"] == r["straight"][2:]  # bit-exact continuation from the checkpoint
    assert results[0]["straight"] != results[1]["straight"]  # ranks saw different data
