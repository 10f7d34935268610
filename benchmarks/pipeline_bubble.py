"""Pipeline bubble on CPU: images/s of DeepSpeed pipeline stages (gloo) against one process, by the number
of micro batches per step.

Each process uses one thread (one core). PP=1 is the plain backbone (forward+backward+AdamW) in one
process; PP=p runs `trainers.pipeline.PipelineEngine` over p processes; each rate is that of the
fastest of `--steps` steps after a warm-up (the least disturbed by other load on a shared machine).
Ideal PP=p throughput is p x the PP=1 rate; the 1F1B schedule idles (p - 1) / (m + p - 1) of a step
(the bubble) with m micro batches, plus the activation sends. Nothing is asserted: numbers go to
stdout and --json.

    python benchmarks/pipeline_bubble.py --stages 2 --micro-batches 1 2 4 8 --json /tmp/bubble.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.multiprocessing as mp

MODEL, SIZE, MICRO = "dit_s2", 16, 4  # DiT-S/2 on 16x16 latents (64 tokens), 4 images per micro batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backbone():
    from nuance.trainers.config import ModelConfig
    from nuance.trainers.models.backbone import build_backbone

    torch.manual_seed(0)
    return build_backbone(ModelConfig(name=MODEL), in_channels=4, sample_size=SIZE)


def _batch() -> dict:
    return {
        "x0": torch.randn(MICRO, 4, SIZE, SIZE),
        "cond": {"class_labels": torch.randint(0, 1000, (MICRO,))},
    }


def _plain(micro_batches: int, steps: int) -> float:
    from nuance.trainers.diffusion import build_objective

    torch.set_num_threads(1)
    backbone, objective = _backbone(), build_objective("flow")
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    batches = [_batch() for _ in range(micro_batches)]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        for b in batches:
            (objective.loss(backbone, b["x0"], b["cond"]) / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return micro_batches * MICRO / min(times[1:])  # the fastest step: least disturbed by other load


def _stage(rank: int, port: int, stages: int, micro_batches: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(stages), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=stages)
    from nuance.trainers.config import EngineConfig, OptimConfig
    from nuance.trainers.diffusion import build_objective
    from nuance.trainers.pipeline.engine import PipelineEngine
    from nuance.trainers.pipeline.layers import pipeline_inputs

    config = EngineConfig(pipeline_stages=stages, zero_stage=1, micro_batches=micro_batches)
    engine = PipelineEngine(_backbone(), config, OptimConfig(lr=1e-4), micro_batch=MICRO, world_size=stages,
                            total_steps=100)  # fmt: skip
    objective = build_objective("flow")

    def prepare(b):
        x_t, t_model, target = objective.noised(b["x0"])
        return pipeline_inputs("dit", x_t, t_model, b["cond"], target)

    batches = [_batch() for _ in range(micro_batches)]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        torch.distributed.barrier()
        start = time.perf_counter()
        engine.train_step(batches, prepare)
        times.append(time.perf_counter() - start)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"img_per_s": micro_batches * MICRO / min(times[1:])}, f)
    torch.distributed.destroy_process_group()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for m in args.micro_batches:
        plain = _plain(m, args.steps)
        out = f"/tmp/pipeline_bubble_{os.getpid()}.json"
        mp.start_processes(_stage, args=(free_port(), args.stages, m, args.steps, out), nprocs=args.stages,
                           join=True, start_method="spawn")  # fmt: skip
        with open(out) as f:
            piped = json.load(f)["img_per_s"]
        ideal_bubble = (args.stages - 1) / (m + args.stages - 1)
        row = {"micro_batches": m, "pp1_img_s": plain, f"pp{args.stages}_img_s": piped,
               "efficiency": piped / (args.stages * plain), "ideal_efficiency": 1 - ideal_bubble}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": MODEL, "latent": SIZE, "micro_batch": MICRO, "stages": args.stages, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
