"""`nuance k8s render RECIPE [key=value ...] [--image IMG] [--workers N] [--gpus-per-worker G]
[--namespace NS] [--runs-claim PVC] [--storage-class CLASS]`: print a ConfigMap, the ReadWriteMany run
storage claim (unless checkpoints go to s3://), a NetworkPolicy and a KubeRay RayJob that run the recipe
(`kubectl apply -f -`)."""

from __future__ import annotations

import argparse
import sys

from nuance.orchestration.k8s import DEFAULT_IMAGE, RUNS_CLAIM  # light: yaml + the schema dataclasses


class _IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides come before or after the options (`RECIPE --workers 2 k=v`)."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def _count(minimum: int):
    """argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _note(message: str) -> None:
    """Notes go to stderr so that stdout stays a clean manifest stream."""
    print(f"[nuance] k8s: {message}", file=sys.stderr)


def cmd_render(ns: argparse.Namespace) -> int:
    from nuance.orchestration.cli import _split_recipe_args
    from nuance.orchestration.k8s import plan_cluster, plan_storage, render_rayjob, to_yaml
    from nuance.orchestration.recipe import load_recipe, recipe_to_yaml

    name, overrides = _split_recipe_args(ns.args)
    recipe, path = load_recipe(name, overrides)
    workers, gpus, sizing = plan_cluster(recipe, ns.workers, ns.gpus_per_worker)
    sizing += plan_storage(recipe)  # checkpoints on the shared claim unless the recipe says s3://
    if sizing:
        before, storage = recipe.cluster.num_workers, recipe.cluster.storage_path
        recipe, path = load_recipe(name, sizing + overrides)
        if recipe.cluster.num_workers != before:
            _note(
                f"cluster.num_workers {before} -> {recipe.cluster.num_workers} ({workers} pods x {gpus} GPUs)"
            )
        if recipe.cluster.storage_path != storage:
            _note(
                f"cluster.storage_path '{storage}' -> '{recipe.cluster.storage_path}' (claim {ns.runs_claim})"
            )
    source = f"{path}" + (f" + {' '.join(sizing + overrides)}" if sizing or overrides else "")
    recipe_yaml = f"# rendered by nuance k8s render from {source}\n" + recipe_to_yaml(recipe)
    docs = render_rayjob(
        recipe,
        recipe_yaml,
        image=ns.image,
        workers=workers,
        gpus_per_worker=gpus,
        namespace=ns.namespace,
        name=ns.name,
        runs_claim=ns.runs_claim,
        storage_class=ns.storage_class,
    )
    sys.stdout.write(to_yaml(docs))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests for a recipe")
    ksub = p.add_subparsers(dest="k8s_command", required=True, parser_class=_IntermixedParser)
    r = ksub.add_parser(
        "render",
        help="print a ConfigMap (the recipe) + a RayJob that runs it; pipe to `kubectl apply -f -`",
    )
    r.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]")
    r.add_argument("--image", default=DEFAULT_IMAGE, help="container image with nuance installed")
    r.add_argument(
        "--workers", type=_count(1), default=None, help="worker pods (default: from the recipe's cluster)"
    )
    r.add_argument(
        "--gpus-per-worker",
        type=_count(0),
        default=None,
        help="GPUs per worker pod; > 0 trains with one Ray Train worker per GPU, 0 on CPUs (default: recipe)",
    )
    r.add_argument("--namespace", default=None, help="metadata.namespace of the manifests")
    r.add_argument("--name", default=None, help="RayJob name (default: the recipe's name, made DNS-safe)")
    r.add_argument(
        "--runs-claim",
        default=RUNS_CLAIM,
        help="ReadWriteMany PersistentVolumeClaim mounted at /runs for checkpoints, rendered too "
        "(unused when cluster.storage_path is s3://)",
    )
    r.add_argument(
        "--storage-class", default=None, help="storageClassName of that claim (one that offers ReadWriteMany)"
    )
    r.set_defaults(func=cmd_render)
