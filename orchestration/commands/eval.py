"""`nuance eval CHECKPOINT`: conditional accuracy and KID of a checkpoint's samples (offline).

    nuance eval outputs/quickstart/step_00000400                 # EMA weights, the recipe's sampler
    nuance eval CKPT --no-ema --steps 50 --cfg 2 --json out.json

The feature network is a small classifier that nuance trains on the run's real images (their `cls`
labels) and caches; see `nuance.trainers.quality`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_eval(ns: argparse.Namespace) -> int:
    from nuance.trainers.quality import evaluate_checkpoint

    scores = evaluate_checkpoint(
        ns.checkpoint,
        data_source=ns.data,
        per_condition=ns.num,
        steps=ns.steps,
        cfg=ns.cfg,
        sampler=ns.sampler,
        use_ema=not ns.no_ema,
        seed=ns.seed,
    )
    print(
        f"[nuance] conditional accuracy {scores['accuracy']:.3f} | KID {scores['kid']:.4f} | "
        f"{int(scores['num_samples'])} samples | classifier on held-out real images "
        f"{scores['real_accuracy']:.3f}"
    )
    if ns.json:
        Path(ns.json).write_text(json.dumps(scores, indent=1))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from nuance.trainers.config import Sampler

    p = subparsers.add_parser(
        "eval", help="score a checkpoint's samples: conditional accuracy and KID against the real images"
    )
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="labelled image shards (default: the recipe's data.source)")
    p.add_argument("--num", type=int, default=8, help="samples per class (up to 16 classes)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the recipe's)")
    p.add_argument("--sampler", default=Sampler.default, choices=list(Sampler))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_eval)
