"""What every recipe kind's loop shares: the data stream, resume, per-step bookkeeping (key audit,
metrics, W&B, NaN guard), sample grids and checkpoints. A loop module only builds its models and
engines and says what one optimizer step is; `Harness.end_step` does the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time

import torch

from nuance.data.builder import build_stream
from nuance.trainers import checkpoint, faults
from nuance.trainers.components import Components
from nuance.trainers.config import OptimConfig, RunConfig, config_to_dict, config_to_yaml
from nuance.trainers.context import RunContext, reseed_for_rank
from nuance.trainers.ema import EMA
from nuance.trainers.engine import StepStats, TrainEngine, build_engine, global_batch_size
from nuance.trainers.quality import Evaluator
from nuance.trainers.sampling import generate, save_grid
from nuance.trainers.tracking import Tracker, peak_flops, train_flops_per_sample, zero_grads
from nuance.trainers.zero_init import is_partitioned, meta_copy


class Harness:
    def __init__(
        self, recipe: RunConfig, ctx: RunContext, comps: Components, *, data_rank: int | None = None,
        data_world: int | None = None,
    ):  # fmt: skip
        """`data_rank` / `data_world`: the data-parallel rank and size the stream is split by (default
        the worker's rank and world; a pipeline's stages of one replica share a data-parallel rank)."""
        self.recipe, self.ctx, self.comps = recipe, ctx, comps
        self.latent_shape = comps.latent_shape if recipe.vae != "none" else None
        self.data_world = ctx.world_size if data_world is None else data_world
        self.stream = build_stream(
            recipe.data,
            rank=ctx.rank if data_rank is None else data_rank,
            world_size=self.data_world,
            seed=recipe.train.seed,
            latent_shape=self.latent_shape,
        )
        self.key_log = ctx.open_rank_file("keys", "jsonl") if recipe.data.log_keys else None
        self.tracker: Tracker | None = None
        self.flops_per_image: float | None = None
        self.last: dict = {}
        self._batches = None
        self._window = (time.perf_counter(), 0.0, 0)  # (start, data wait, steps)
        self._quality: Evaluator | None | bool = None  # False: the data cannot be evaluated

    # -- inputs -----------------------------------------------------------------------------------
    def to_x0(self, batch: dict) -> torch.Tensor:
        """Clean latents of a batch: VAE-encoded pixels, or z ~ N(mean, exp(logvar)) from precomputed
        latents (drawn with the trainer's RNG, so a resume reproduces it)."""
        device = self.ctx.device
        if "pixels" in batch:
            return self.comps.autoencoder.encode(batch["pixels"].to(device, non_blocking=True))
        mean = batch["latent_mean"].to(device, non_blocking=True)
        std = torch.exp(0.5 * batch["latent_logvar"].to(device, non_blocking=True))
        return mean + std * torch.randn_like(mean)

    def cond(self, batch: dict, dropout: float | None = None) -> dict[str, torch.Tensor]:
        """Training condition kwargs on the device, with CFG condition dropout."""
        p = self.recipe.objective.cond_dropout if dropout is None else dropout
        return {k: v.to(self.ctx.device) for k, v in self.comps.conditioner.training(batch, p).items()}

    def count_flops(self, loss_of) -> None:
        """FLOPs per image of one training step's forward+backward: `loss_of(backbone, x0, cond)` counted
        once on two synthetic examples (rank 0, before the engine exists), so no data is read and the
        memory stays that of a tiny batch. A ZeRO-3 backbone (partitioned at construction) is counted on
        a meta-device copy of its architecture. The counted RNG draws are undone."""
        if self.ctx.rank != 0:
            return
        examples, backbone, device = 2, self.comps.backbone, self.ctx.device
        if is_partitioned(backbone):
            backbone, device = type(backbone)(meta_copy(backbone.net), backbone.family), torch.device("meta")
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            x0 = torch.randn(examples, *self.comps.latent_shape, device=device)
            cond = {k: v.to(device) for k, v in self.comps.conditioner.null(examples).items()}
            try:
                self.flops_per_image = train_flops_per_sample(lambda: loss_of(backbone, x0, cond), examples)
            except (RuntimeError, NotImplementedError) as err:  # an op without a meta kernel
                self.ctx.log(f"FLOPs not counted (no MFU in the logs): {str(err).splitlines()[0]}")
        zero_grads(self.comps.backbone)

    # -- engines and state --------------------------------------------------------------------------
    def engine(
        self, module: torch.nn.Module, *, optim: OptimConfig | None = None, trainable_only: bool = False
    ) -> TrainEngine:
        """The recipe's engine for `module` (`optim` overrides the optimizer slice; `trainable_only`:
        checkpoints hold the trainable parameters only, as for LoRA)."""
        recipe = self.recipe
        return build_engine(
            module,
            recipe.engine,
            optim or recipe.optim,
            micro_batch=recipe.data.batch_size,
            world_size=self.ctx.world_size,
            total_steps=recipe.optim.decay_steps or recipe.train.max_steps,
            trainable_only=trainable_only,
        )

    def start(self, engine: TrainEngine, extra_engines: dict | None = None) -> tuple[EMA | None, int]:
        """EMA of the engine's module, per-rank noise seed, then resume: returns (ema, step reached)."""
        recipe = self.recipe
        ema = EMA(engine.module, recipe.train.ema_decay) if recipe.train.ema_decay > 0 else None
        reseed_for_rank(recipe.train.seed, self.ctx.rank)
        return ema, self.resume(engine, ema, extra_engines)

    def resume(self, engine: TrainEngine, ema: EMA | None, extra_engines: dict | None = None) -> int:
        """Load the checkpoint to resume from (if any) and start tracking; returns the step reached."""
        step, same_run = 0, True
        if self.ctx.resume_from:
            meta, data_state = checkpoint.load(
                self.ctx.resume_from,
                engine=engine,
                ema=ema,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                extra_engines=extra_engines,
            )
            self.stream.load_state_dict(data_state)
            step, same_run = meta["step"], meta.get("run_id") == self.ctx.run_id
            self.ctx.log(f"resumed from {self.ctx.resume_from} at step {step}")
        self.tracker = Tracker(
            self.recipe.tracking,
            run_name=self.recipe.name,
            run_id=self.ctx.run_id,
            run_dir=self.ctx.run_dir,
            config=self.ctx.recipe or config_to_dict(self.recipe),
            enabled=self.ctx.rank == 0,
            resume_step=step,  # the history continues at step + 1 (W&B rewound, not replayed)
            rewind=same_run,
        )
        self._batches = iter(self.stream)
        self._window = (time.perf_counter(), 0.0, 0)
        return step

    def next_batches(self, count: int | None = None) -> list[dict]:
        """The micro batches of one optimizer step (default: engine.micro_batches of them)."""
        t0 = time.perf_counter()
        batches = [next(self._batches) for _ in range(count or self.recipe.engine.micro_batches)]
        start, waited, steps = self._window
        self._window = (start, waited + time.perf_counter() - t0, steps)
        return batches

    def _save(self, step: int, engine: TrainEngine, ema: EMA | None, extra_engines: dict | None) -> None:
        meta = {
            "step": step,
            "world_size": self.ctx.world_size,
            "zero_stage": self.recipe.engine.zero_stage,
            "engine": engine.backend,
            "run_id": self.ctx.run_id,
            "kind": self.recipe.kind,
            "architecture": self.comps.backbone.architecture,  # sample / export rebuild exactly this
        }
        with tempfile.TemporaryDirectory(prefix="nuance-ckpt-") as tmp:
            checkpoint.save(
                tmp,
                engine=engine,
                extra_engines=extra_engines,
                ema=ema,
                data_state=self.stream.state_dict(),
                meta=meta,
                recipe_yaml=config_to_yaml(self.recipe),
                rank=self.ctx.rank,
            )
            self.ctx.report({**self.last, "step": step}, tmp)
        if self.ctx.storage_url:
            self.tracker.note_checkpoint(step, f"{self.ctx.storage_url}/step_{step:08d}")

    # -- per step ---------------------------------------------------------------------------------
    def end_step(
        self,
        step: int,
        stats: StepStats,
        batches: list[dict],
        *,
        engine: TrainEngine,
        ema: EMA | None,
        extra_engines: dict | None = None,
        extra_metrics=None,
    ) -> None:
        """Bookkeeping after optimizer step `step`: key audit, metrics, sample grid, checkpoint.
        `extra_metrics` is a callable giving more metrics (read only on log steps: it may sync)."""
        recipe = self.recipe
        faults.maybe_out_of_memory(step, self.ctx.rank)  # tests only: NUANCE_FAULT=oom:...
        start, waited, steps = self._window
        self._window = (start, waited, steps + 1)
        if self.key_log is not None:
            self.key_log.write(
                json.dumps({"step": step, "keys": [k for b in batches for k in b["key"]]}) + "\n"
            )
            self.key_log.flush()
        final = step == recipe.train.max_steps
        if step % recipe.train.log_every == 0 or final:
            self._log(step, stats, extra_metrics() if extra_metrics else {})
        if self.samples_at(step):
            self.sample_grid(step, engine, ema)
        if self.saves_at(step):
            self._save(step, engine, ema, extra_engines)

    def samples_at(self, step: int) -> bool:
        every, final = self.recipe.sample.every, step == self.recipe.train.max_steps
        return bool(every and step % every == 0) or final

    def saves_at(self, step: int) -> bool:
        every, final = self.recipe.train.ckpt_every, step == self.recipe.train.max_steps
        return bool(every and step % every == 0) or final

    def _log(self, step: int, stats: StepStats, extra: dict) -> None:
        recipe = self.recipe
        loss, grad_norm = stats.as_floats()  # the only host-device sync of a step
        if not math.isfinite(loss):
            self.tracker.alert("nuance: loss is not finite", f"run {recipe.name}: loss={loss} at step {step}")
            raise FloatingPointError(f"loss became {loss} by step {step}; lower optim.lr or check the data")
        start, waited, steps = self._window
        elapsed = time.perf_counter() - start
        img_s = (
            global_batch_size(recipe.data.batch_size, recipe.engine.micro_batches, self.data_world) * steps
        )
        img_s /= elapsed
        last = {
            "loss": loss,
            "lr": stats.lr,
            "grad_norm": grad_norm,
            "img_per_s": img_s,
            "data_wait_frac": waited / elapsed,
            **extra,
        }
        if self.ctx.device.type == "cuda":  # the caching allocator's counter: no device sync
            last["gpu/peak_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        peak = peak_flops(recipe.tracking)
        if self.flops_per_image and peak:
            last["mfu"] = self.flops_per_image * img_s / (peak * self.ctx.world_size)
        last["data/bad_fraction"] = self.stream.bad_fraction
        last.update({f"data/bad_{reason}": n for reason, n in self.stream.bad_counts.items()})
        self.last = last
        self.tracker.log(last, step)
        self.ctx.log(
            f"step {step}/{recipe.train.max_steps} | loss {loss:.4f} | lr {stats.lr:.2e} | "
            f"gnorm {grad_norm:.3f} | {img_s:.1f} img/s | data {100 * last['data_wait_frac']:.0f}%"
        )
        self._window = (time.perf_counter(), 0.0, 0)

    @torch.no_grad()
    def sample_grid(self, step: int, engine: TrainEngine, ema: EMA | None, steps: int | None = None) -> None:
        """A sample grid from the (EMA) model, and the quality metrics when sample.eval_per_condition > 0;
        under ZeRO-3 every rank holds a slice, so all take part."""
        recipe, ctx = self.recipe, self.ctx
        if ctx.rank != 0 and not (engine.backend == "deepspeed" and recipe.engine.zero_stage == 3):
            return
        smp = recipe.sample
        images, titles = self._generate(engine, ema, smp.prompts, smp.classes, smp.num_per_condition, steps)
        if ctx.rank == 0:
            path = save_grid(
                images, ctx.run_dir / "samples" / f"step_{step:08d}.png", ncol=smp.num_per_condition
            )
            self.tracker.log_image("samples", path, " | ".join(dict.fromkeys(titles)), step)
            ctx.log(f"sample grid: {path}")
        evaluator = self._evaluator()
        if evaluator is not None:
            prompts, classes = evaluator.conditions(self.comps.conditioner.conditioning)
            images, _ = self._generate(engine, ema, prompts, classes, smp.eval_per_condition, steps)
            if ctx.rank == 0:
                scores = evaluator.score(images, smp.eval_per_condition)
                self.tracker.log({f"eval/{k}": v for k, v in scores.items()}, step)
                ctx.log(f"eval: conditional accuracy {scores['accuracy']:.3f} | KID {scores['kid']:.4f}")

    def _generate(self, engine, ema, prompts, classes, num_per_condition, steps=None):
        smp, comps = self.recipe.sample, self.comps
        engine.module.eval()
        try:
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                return generate(
                    engine.inference_model,
                    comps.objective,
                    comps.conditioner,
                    comps.autoencoder,
                    prompts=prompts,
                    classes=classes,
                    num_per_condition=num_per_condition,
                    latent_shape=comps.latent_shape,
                    steps=steps or smp.steps,
                    cfg=smp.cfg,
                    sampler=smp.sampler,
                    seed=smp.seed,
                    device=self.ctx.device,
                )
        finally:
            engine.module.train()

    def _evaluator(self) -> Evaluator | None:
        """The quality evaluator of the run's data, built at the first sample step (None: off)."""
        if self.recipe.sample.eval_per_condition <= 0 or self._quality is False:
            return None
        if self._quality is None:
            try:
                self._quality = Evaluator.for_data(self.recipe.data)
            except ValueError as err:  # latent shards, or images without class labels: train on
                self.ctx.log(f"quality metrics off (sample.eval_per_condition): {err}")
                self._quality = False
                return None
        return self._quality

    def train_loop(self, engine: TrainEngine, ema: EMA | None, step: int, loss_fn) -> dict:
        """The plain loop of one engine: step from `step` to train.max_steps, then finish."""
        while step < self.recipe.train.max_steps:
            batches = self.next_batches()
            stats = engine.train_step(batches, loss_fn)
            if ema is not None:
                ema.update()
            step += 1
            self.end_step(step, stats, batches, engine=engine, ema=ema)
        return self.finish()

    def finish(self) -> dict:
        self.tracker.finish()
        if self.key_log is not None:
            self.key_log.close()
        return self.last
