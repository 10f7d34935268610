"""Kubernetes manifests for a recipe: a ConfigMap holding the recipe and a KubeRay `RayJob` that runs it.

`render_rayjob` builds the documents (plain dicts) and `to_yaml` prints them. The RayJob brings its own
Ray cluster (`rayClusterSpec`: one head pod + one worker group) and deletes it when the job ends. Every
pod runs as a non-root user with no capabilities, has a memory-backed `/dev/shm`, and reads its
credentials from the Secret `nuance-credentials` by `secretKeyRef` (never by value; each key is
optional, so a run without W&B or S3 still starts). `k8s/` holds the kustomize equivalent (base +
overlays) of the same pods; keep the two in step.

Sizing: `workers` is the number of worker pods and `gpus_per_worker` the GPUs of each pod (0: CPU
pods). The recipe's Ray Train workers (`cluster.num_workers`, each with `cluster.gpus_per_worker` GPUs
and `cluster.cpus_per_worker` CPUs) are spread evenly over the pods; `check_fits` refuses a cluster
they do not fit in, and `plan_cluster` turns the command line's choices into recipe overrides.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from nuance.orchestration.schema import Recipe

RAY_API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
"""Ray of the image (pyproject pins ray==2.60.0); KubeRay reads it for version-dependent features."""
DEFAULT_IMAGE = "nuance:latest"
RECIPE_DIR = "/recipes"
RECIPE_KEY = "recipe.yaml"
ENTRYPOINT = f"nuance train {RECIPE_DIR}/{RECIPE_KEY}"
SECRET_NAME = "nuance-credentials"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "WANDB_API_KEY")
"""Environment variables read from the Secret `SECRET_NAME` (key = variable name)."""
GPU_RESOURCE = "nvidia.com/gpu"
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "WARN"}
"""Set on GPU pods. NVLink SHARP (NVLS) multicast needs IMEX/fabric-manager setup most clusters lack."""
RUN_AS_USER = 1000
"""uid of the `ray` user of the rayproject/ray images that a nuance image is built on."""

MAX_RAYJOB_NAME = 47
"""KubeRay: a RayCluster name is a DNS-1035 label of <= 53 characters; a RayJob appends 6 to make one."""
HEAD_CPUS = 2
HEAD_MEMORY_GI = 8
HEAD_SHM_GI = 2
CPU_MEMORY_GI = 4
"""Host memory per Ray Train worker on a CPU pod."""
CPU_SHM_GI = 1
GPU_MEMORY_GI = 64
"""Host memory per GPU (data loading, pinned buffers, DeepSpeed CPU offload)."""
GPU_SHM_GI = 16
"""/dev/shm per GPU (NCCL shared-memory transport, DataLoader worker tensors)."""
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def k8s_name(text: str, max_length: int = MAX_RAYJOB_NAME) -> str:
    """`text` as a DNS-1035 label (lowercase letters, digits, '-'; starts with a letter), which is also
    a valid DNS-1123 label and subdomain: 'My_Run.v2' -> 'my-run-v2', '1run' -> 'nuance-1run'."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if not name[:1].isalpha():
        name = f"nuance-{name}" if name else "nuance"
    return name[:max_length].rstrip("-")


def check_namespace(namespace: str) -> str:
    """A namespace must be a DNS-1123 label; returns it unchanged or raises ValueError."""
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace '{namespace}' is not a valid DNS-1123 label (a-z, 0-9, '-'; <= 63)")
    return namespace


def gpu_demand(recipe: Recipe) -> int:
    """GPUs the recipe's Ray Train workers ask for in all (0 on CPU)."""
    cl = recipe.cluster
    return math.ceil(cl.num_workers * cl.gpus_per_worker) if cl.use_gpu else 0


def per_pod(recipe: Recipe, workers: int) -> int:
    """Ray Train workers per worker pod when `cluster.num_workers` are spread over `workers` pods."""
    return math.ceil(recipe.cluster.num_workers / workers)


def plan_cluster(
    recipe: Recipe, workers: int | None = None, gpus_per_worker: int | None = None
) -> tuple[int, int, list[str]]:
    """Worker pods, GPUs per pod and the recipe overrides that make the recipe use exactly them.

    Without `gpus_per_worker` the recipe decides: one pod per Ray Train worker (or `workers` pods
    sharing them). With `gpus_per_worker` > 0, the run gets one Ray Train worker per GPU
    (`cluster.use_gpu=true cluster.gpus_per_worker=1 cluster.num_workers=<pods x GPUs>`); with 0, a CPU
    run (`cluster.use_gpu=false`). Overrides the user gives on the command line come after these, so
    they win; `check_fits` then refuses what does not fit.
    """
    cl = recipe.cluster
    if gpus_per_worker is None:
        pods = workers or cl.num_workers
        gpus = math.ceil(per_pod(recipe, pods) * cl.gpus_per_worker) if cl.use_gpu else 0
        return pods, gpus, []
    if gpus_per_worker == 0:
        return workers or cl.num_workers, 0, ["cluster.use_gpu=false"]
    pods = workers or max(1, math.ceil((gpu_demand(recipe) or cl.num_workers) / gpus_per_worker))
    overrides = [
        "cluster.use_gpu=true",
        "cluster.gpus_per_worker=1",
        f"cluster.num_workers={pods * gpus_per_worker}",
    ]
    return pods, gpus_per_worker, overrides


def check_fits(recipe: Recipe, workers: int, gpus_per_worker: int) -> None:
    """Raise ValueError (one line, naming the keys) unless the recipe's workers fit the pods."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    cl = recipe.cluster
    if not cl.use_gpu and gpus_per_worker > 0:
        raise ValueError(
            f"recipe has cluster.use_gpu=false but the pods get {gpus_per_worker} GPU(s) each; "
            f"set cluster.use_gpu=true or --gpus-per-worker 0"
        )
    need = math.ceil(per_pod(recipe, workers) * cl.gpus_per_worker) if cl.use_gpu else 0
    if need > gpus_per_worker:
        raise ValueError(
            f"cluster.num_workers={cl.num_workers} x cluster.gpus_per_worker={cl.gpus_per_worker:g} "
            f"need {need} GPU(s) per pod on {workers} worker pod(s), but pods get {gpus_per_worker}"
        )


def pod_resources(recipe: Recipe, workers: int, gpus_per_worker: int) -> tuple[dict, int]:
    """Container resources (requests = limits, Guaranteed QoS) of one worker pod, and its /dev/shm GiB.

    CPUs: the Ray Train workers' `cluster.cpus_per_worker` plus one per DataLoader process
    (`data.num_workers`); memory: `GPU_MEMORY_GI` per GPU or `CPU_MEMORY_GI` per CPU worker, plus
    /dev/shm (memory-backed, so it counts against the limit).
    """
    n = per_pod(recipe, workers)
    cpus = math.ceil(n * recipe.cluster.cpus_per_worker) + n * recipe.data.num_workers
    if gpus_per_worker:
        shm = GPU_SHM_GI * gpus_per_worker
        memory = GPU_MEMORY_GI * gpus_per_worker + shm
    else:
        shm = CPU_SHM_GI * n
        memory = CPU_MEMORY_GI * n + shm
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory}Gi"}
    if gpus_per_worker:
        amounts[GPU_RESOURCE] = str(gpus_per_worker)
    return {"requests": dict(amounts), "limits": dict(amounts)}, shm


def container_security_context() -> dict:
    """Non-root, no privilege escalation, no Linux capabilities."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> dict:
    """Pod-level counterpart: uid/gid 1000, volumes group-owned by 1000, the runtime's seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def secret_env() -> list[dict]:
    """S3 and W&B credentials from the Secret, by reference; optional so that pods start without them."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key, "optional": True}}}
        for key in SECRET_ENV
    ]


def ray_container(name: str, image: str, resources: dict, gpu: bool) -> dict:
    """The Ray container of a head or worker pod (KubeRay supplies the `ray start` command)."""
    env = secret_env() + ([{"name": k, "value": v} for k, v in NCCL_ENV.items()] if gpu else [])
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources,
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
        ],
    }


def pod_template(container: dict, configmap: str, shm_gi: int, labels: dict, gpu: bool) -> dict:
    """A pod template around `container` with the /dev/shm and recipe volumes."""
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}},
            {"name": "recipe", "configMap": {"name": configmap}},
        ],
    }
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def submitter_template(image: str, labels: dict) -> dict:
    """The pod that runs `ray job submit` (KubeRay fills in its command), as locked down as the others."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": SUBMITTER_RESOURCES,
        "securityContext": container_security_context(),
    }
    spec = {"restartPolicy": "Never", "securityContext": pod_security_context(), "containers": [container]}
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _metadata(name: str, namespace: str | None, labels: dict) -> dict:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def render_rayjob(
    recipe: Recipe,
    recipe_yaml: str,
    *,
    image: str,
    workers: int,
    gpus_per_worker: int,
    namespace: str | None = None,
    name: str | None = None,
) -> list[dict]:
    """[ConfigMap with `recipe_yaml`, RayJob running it on its own cluster of `workers` worker pods]."""
    check_fits(recipe, workers, gpus_per_worker)
    if not image:
        raise ValueError("image must be a non-empty image reference")
    if namespace:
        check_namespace(namespace)
    job = k8s_name(name or recipe.name)
    configmap = f"{job}-recipe"
    labels = {"app.kubernetes.io/name": "nuance", "app.kubernetes.io/instance": job}
    gpu = gpus_per_worker > 0
    head_amounts = {"cpu": str(HEAD_CPUS), "memory": f"{HEAD_MEMORY_GI + HEAD_SHM_GI}Gi"}
    head = ray_container("ray-head", image, {"requests": head_amounts, "limits": dict(head_amounts)}, False)
    worker_resources, worker_shm = pod_resources(recipe, workers, gpus_per_worker)
    worker = ray_container("ray-worker", image, worker_resources, gpu)
    cluster_spec = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": pod_template(head, configmap, HEAD_SHM_GI, labels, False),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu" if gpu else "cpu",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": pod_template(worker, configmap, worker_shm, labels, gpu),
            }
        ],
    }
    configmap_doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(configmap, namespace, labels),
        "data": {RECIPE_KEY: recipe_yaml},
    }
    rayjob = {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(job, namespace, labels),
        "spec": {
            "entrypoint": ENTRYPOINT,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "submitterPodTemplate": submitter_template(image, labels),
            "rayClusterSpec": cluster_spec,
        },
    }
    return [configmap_doc, rayjob]


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings (the recipe) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict]) -> str:
    """A multi-document YAML stream (`---` between documents), keys in insertion order."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
