"""`nuance` command line.

    nuance train [RECIPE] [key=value ...]      # default recipe: quickstart (offline, CPU, 2 workers)
    nuance recipe show [RECIPE] [key=value ...]
    nuance sample CHECKPOINT --prompt "a red circle" --steps 30 --cfg 4
    nuance export CHECKPOINT OUT

CPU example: `nuance train quickstart train.max_steps=50`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

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
    from nuance.orchestration.launch import check_run, run_dir_for, train

    name, overrides = _split_recipe_args(ns.args)
    recipe, path = load_recipe(name, overrides)
    preflight(recipe, str(path))
    recipe = check_run(recipe, str(path))  # Ray address, S3, data source: before Ray starts
    run_dir = run_dir_for(recipe)
    print(f"[nuance] recipe {path} -> run '{recipe.name}' in {run_dir}", flush=True)
    try:
        result = train(recipe, checked=True)
    except (RecipeError, ValueError, FileNotFoundError, OSError):
        raise  # the driver's own checks and storage errors: main() prints them as one line
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
    print(f"nuance: error: {failure_summary(str(error), OOM_PREFIX)}", file=sys.stderr, flush=True)
    return 1


# The exception a worker raised, as its traceback's last line shows it ("ShardUnavailableError: rank 0:
# shard s3://... is missing ..."); Ray's own wrappers around it are not the cause.
_ERROR_LINE = re.compile(r"\b([A-Z]\w*(?:Error|Exception)): (\S.*)")
_WRAPPERS = ("Ray", "Training", "WorkerGroup", "ActorDied")


def failure_summary(text: str, oom_prefix: str) -> str:
    """One line for a failed run: the worker's out-of-memory hint, else the exception it raised, else the
    error's first line."""
    lines = text.splitlines()
    hints = [line[line.index(oom_prefix) :] for line in lines if oom_prefix in line]
    if hints:
        return hints[-1]
    raised = [m for line in lines if (m := _ERROR_LINE.search(line)) and not m.group(1).startswith(_WRAPPERS)]
    if raised:
        return f"training failed: {raised[-1].group(1)}: {raised[-1].group(2).strip()}"
    return f"training failed: {(text.strip().splitlines() or ['?'])[0]}"


def _check_checkpoint(directory: str) -> None:
    """A missing checkpoint fails at once, not after seconds of importing torch and diffusers (the same
    check as ``trainers.checkpoint.read_meta``, which follows)."""
    if "://" not in directory and not (Path(directory).expanduser() / "meta.json").is_file():
        raise FileNotFoundError(f"{directory} is not a nuance checkpoint (no meta.json)")


def cmd_sample(ns: argparse.Namespace) -> int:
    _check_checkpoint(ns.checkpoint)
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
    _check_checkpoint(ns.checkpoint)
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


DEBUG_ENV = "NUANCE_DEBUG"
USER_ERRORS = (RecipeError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def error_line(err: BaseException) -> str:
    """One line for any error: its message's first line; the type too when the message alone is not
    self-explaining (an unexpected error), with the hint that shows the traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if isinstance(err, USER_ERRORS) or type(err).__module__.startswith("nuance."):
        return text
    if isinstance(err, PermissionError):  # S3 or the file system refused: the credentials or the rights
        return f"permission denied: {text}"
    return f"{type(err).__name__}: {text} ({DEBUG_ENV}=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Every error a user can cause ends as one line `nuance: error: ...` on stderr, exit status 2 for a
    mistake in the input (recipe, paths, arguments), 1 for the rest; ``NUANCE_DEBUG=1`` re-raises."""
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except KeyboardInterrupt:
        print("nuance: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "").strip() in ("1", "true"):
            raise
        print(f"nuance: error: {error_line(err)}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
