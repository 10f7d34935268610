"""`nuance` command line.

    nuance train [RECIPE] [key=value ...]      # default recipe: quickstart (offline, CPU, 2 workers)
    nuance recipe show [RECIPE] [key=value ...]
    nuance sample CHECKPOINT --prompt "a red circle" --steps 30 --cfg 4
    nuance export CHECKPOINT OUT

CPU example: `nuance train quickstart train.max_steps=50`.
"""

from __future__ import annotations

import argparse
import sys

from nuance.orchestration.recipe import RecipeError, load_recipe, preflight, recipe_to_yaml
from nuance.trainers.config import Sampler


def _split_recipe_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE] [k=v ...]`: the first argument without '=' names the recipe."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_recipe_show(ns: argparse.Namespace) -> int:
    name, overrides = _split_recipe_args(ns.args)
    recipe, path = load_recipe(name, overrides)
    print(f"# resolved from {path}" + (f" + {' '.join(overrides)}" if overrides else ""))
    print(recipe_to_yaml(recipe), end="")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from nuance.orchestration.launch import run_dir_for, train

    name, overrides = _split_recipe_args(ns.args)
    recipe, path = load_recipe(name, overrides)
    preflight(recipe, str(path))
    run_dir = run_dir_for(recipe)
    print(f"[nuance] recipe {path} -> run '{recipe.name}' in {run_dir}", flush=True)
    try:
        result = train(recipe)
    except (RecipeError, ValueError, FileNotFoundError):
        raise  # the driver's own checks: main() prints them as one line
    except Exception as err:  # Ray Train raises TrainingFailedError when the workers fail
        return _training_failed(err)
    if result.error is not None:
        return _training_failed(result.error)
    print(f"[nuance] done: {dict(result.metrics or {})}")
    if result.checkpoint is not None:
        print(f"[nuance] latest checkpoint: {result.checkpoint.path}")
    print(f"[nuance] samples: {run_dir / 'samples'}  metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def _training_failed(error: BaseException) -> int:
    """The workers' error in full, then one line last: the worker's hint when it gave one (CUDA out of
    memory), else the error's first line."""
    import ray

    from nuance.trainers.entry import OOM_PREFIX

    print(f"[nuance] run failed: {error}", file=sys.stderr, flush=True)
    ray.shutdown()  # stops the streaming of worker logs, so that the summary below stays the last line
    text = str(error)
    hints = [line[line.index(OOM_PREFIX) :] for line in text.splitlines() if OOM_PREFIX in line]
    summary = hints[-1] if hints else f"training failed: {(text.strip().splitlines() or ['?'])[0]}"
    print(f"nuance: error: {summary}", file=sys.stderr, flush=True)
    return 1


def cmd_sample(ns: argparse.Namespace) -> int:
    from nuance.trainers.inference import sample_from_checkpoint

    paths = sample_from_checkpoint(
        ns.checkpoint,
        prompts=ns.prompt,
        classes=ns.class_ids,
        steps=ns.steps,
        cfg=ns.cfg,
        sampler=ns.sampler,
        num_per_condition=ns.num,
        seed=ns.seed,
        out=ns.out,
        use_ema=not ns.no_ema,
    )
    for p in paths:
        print(p)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from nuance.trainers.inference import export_diffusers

    out = export_diffusers(ns.checkpoint, ns.out, use_ema=not ns.no_ema, merge_lora=ns.merge_lora)
    print(f"[nuance] wrote diffusers folder {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nuance",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe under Ray (embedded cluster, or RAY_ADDRESS)")
    p.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipe", help="inspect recipes")
    rsub = p.add_subparsers(dest="recipe_command", required=True)
    show = rsub.add_parser("show", help="print the resolved recipe")
    show.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]")
    show.set_defaults(func=cmd_recipe_show)

    p = sub.add_parser("sample", help="generate PNGs from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="caption (text models); repeatable")
    p.add_argument(
        "--class",
        dest="class_ids",
        action="append",
        type=int,
        default=[],
        help="class id (class-conditional models); repeatable",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance scale, 1 = off (default: the recipe's sample.cfg, else the objective's)",
    )
    p.add_argument("--sampler", default=Sampler.default, choices=list(Sampler))
    p.add_argument("--num", type=int, default=4, help="images per prompt / class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a diffusers-format folder")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA checkpoints: fold the adapters into the backbone (default: base + adapters in lora/)",
    )
    p.set_defaults(func=cmd_export)

    from nuance.orchestration.commands import command_modules

    for module in command_modules():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        print(f"nuance: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
