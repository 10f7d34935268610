"""Run tracking: Weights & Biases (real client; offline without an API key) plus a local metrics.jsonl.

Only rank 0 tracks. The logged config is the resolved recipe with anything secret-looking redacted.
Also home of the throughput arithmetic (FLOPs per image, MFU).

After a resume from the checkpoint of step N the history continues at N + 1, never backwards: steps
N+1.. that the interrupted attempt had logged are replayed, so metrics.jsonl drops its lines after N,
and the W&B run is rewound to N (`resume_from="<id>?_step=N"`, W&B's run rewind; an offline run records
the rewind point in its run files for `wandb sync`) instead of receiving the replayed steps twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from nuance.trainers.config import TrackingConfig

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "passwd")
# Dense bf16 peak per device (vendor datasheets), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def redact(value, key: str = ""):
    """Copy of a config with values of secret-looking keys replaced by '***'."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if any(word in key.lower() for word in SECRET_WORDS) and value not in (None, ""):
        return "***"
    return value


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """W&B run + metrics.jsonl in the run directory. A disabled tracker (non-zero ranks) does nothing."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_name: str,
        run_id: str,
        run_dir: str | Path,
        config: dict,
        enabled: bool = True,
        resume_step: int = 0,
        rewind: bool = True,
    ):
        """`resume_step`: the step of the checkpoint this attempt resumed from (0: a fresh start).
        `rewind`: that checkpoint belongs to this same W&B run (else a new run starts at its step)."""
        self.enabled = enabled
        self.run = None
        self.run_dir = Path(run_dir)
        self.last_step = resume_step
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if resume_step and metrics.is_file():
            rewind_jsonl(metrics, resume_step)
        self._jsonl = open(metrics, "a")  # noqa: SIM115 - closed in finish()
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return
        import wandb

        init = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=run_name,
            tags=cfg.tags,
            mode=mode,
            dir=str(self.run_dir),
            config=redact(config),
            settings=wandb.Settings(silent=True, x_disable_stats=False),
        )
        if resume_step and rewind:
            try:  # W&B truncates the run's history after the checkpoint's step
                self.run = wandb.init(**init, resume_from=f"{run_id}?_step={resume_step}")
                return
            except wandb.Error as err:  # e.g. a server without run rewind
                print(f"[nuance] W&B could not rewind run {run_id} to step {resume_step}: {err}", flush=True)
        self.run = wandb.init(**init, id=run_id, resume="allow")

    @property
    def wandb_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        assert step >= self.last_step, f"step {step} logged after step {self.last_step}"
        self.last_step = step
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, caption: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def note_checkpoint(self, step: int, url: str) -> None:
        """Reference the latest checkpoint in the W&B run's summary."""
        if self.run is not None:
            self.run.summary.update({"checkpoint/latest": url, "checkpoint/step": step})

    def alert(self, title: str, text: str) -> None:
        if self.run is not None and self.run.settings.mode == "online":
            self.run.alert(title=title, text=text)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.run is not None:
            self.run.finish()


def rewind_jsonl(path: Path, step: int) -> None:
    """Drop the lines of a metrics.jsonl logged after `step` (they are about to be replayed)."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def train_flops_per_sample(loss_fn, batch_size: int) -> float:
    """FLOPs of one forward+backward, counted by torch's FlopCounterMode, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn().backward()
    return counter.get_total_flops() / batch_size


def peak_flops(cfg: TrackingConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None
