"""Kubernetes manifests for a recipe: a ConfigMap holding the recipe and a KubeRay `RayJob` that runs it.

`render_rayjob` builds the documents (plain dicts) and `to_yaml` prints them. The RayJob brings its own
Ray cluster (`rayClusterSpec`: one head pod + one worker group) and deletes it when the job ends.
`k8s/` holds the kustomize equivalent (base + overlays) of the same pods; keep the two in step.

Defaults a platform team can accept:
- every pod: non-root uid 1000, no capabilities, read-only root filesystem (writable emptyDirs only
  where Ray and the caches write: `/tmp`, `~/.cache`, `~/.config`, memory-backed `/dev/shm`), no
  service-account token (nothing in a pod talks to the Kubernetes API);
- credentials only by `secretKeyRef`: S3 / W&B from `nuance-credentials` (each key optional, so a run
  without W&B or S3 still starts), the Ray token from `nuance-ray-auth` (required);
- Ray token authentication (`authOptions` for the KubeRay operator, `RAY_AUTH_MODE=token` and
  `RAY_AUTH_TOKEN` in every Ray container and the submitter);
- a NetworkPolicy: the Ray pods talk to each other; the Jobs API (dashboard port) admits only pods of
  the namespace and the KubeRay operator; egress is DNS, the Ray pods, and HTTPS;
- checkpoints on shared storage: `cluster.storage_path` is s3://, or a path under `/runs`, a
  ReadWriteMany PersistentVolumeClaim mounted in every Ray pod (never pod-local disk).

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

from nuance.orchestration.launch import is_remote
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
RAY_AUTH_SECRET = "nuance-ray-auth"
RAY_AUTH_KEY = "auth_token"
"""The Secret (and its key, KubeRay's convention for `authOptions.secretName`) holding the Ray token."""
RUNS_DIR = "/runs"
RUNS_CLAIM = "nuance-runs"
RUNS_SIZE = "100Gi"
"""Shared run storage: a ReadWriteMany claim mounted at RUNS_DIR when checkpoints are not on s3://."""
HOME_DIR = "/home/ray"
WRITABLE_DIRS = {"tmp": "/tmp", "cache": f"{HOME_DIR}/.cache", "config": f"{HOME_DIR}/.config"}
"""emptyDir mounts of the Ray containers (read-only root): Ray's session dir and temp files; nuance's,
torch's, DeepSpeed's and W&B's caches (and nuance's local run folder when checkpoints go to s3://);
W&B's settings."""
CACHE_ENV = {"TRITON_CACHE_DIR": f"{HOME_DIR}/.cache/triton"}
"""Writers whose default is outside the writable mounts (Triton: ~/.triton)."""
DASHBOARD_PORT = 8265
"""Ray's dashboard / Jobs API port: the NetworkPolicy admits only the namespace's pods and the operator."""
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
"""Labels of the KubeRay operator's pod (Helm chart), which polls the Jobs API of a RayJob's cluster."""
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
    """Non-root, no privilege escalation, no Linux capabilities, read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
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


def ray_auth_env() -> list[dict]:
    """Ray token authentication: the token from its Secret by reference, required (no token, no pod)."""
    ref = {"name": RAY_AUTH_SECRET, "key": RAY_AUTH_KEY}
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": ref}},
    ]


def writable_mounts(names=tuple(WRITABLE_DIRS)) -> tuple[list[dict], list[dict]]:
    """(volumeMounts, volumes) of the emptyDirs a container with a read-only root writes to."""
    mounts = [{"name": n, "mountPath": WRITABLE_DIRS[n]} for n in names]
    return mounts, [{"name": n, "emptyDir": {}} for n in names]


def ray_container(name: str, image: str, resources: dict, gpu: bool, runs: bool = False) -> dict:
    """The Ray container of a head or worker pod (KubeRay supplies the `ray start` command); `runs`:
    mount the shared run storage at RUNS_DIR."""
    env = secret_env() + ray_auth_env() + [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
    env += [{"name": k, "value": v} for k, v in NCCL_ENV.items()] if gpu else []
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
    ]
    mounts += [{"name": "runs", "mountPath": RUNS_DIR}] if runs else []
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources,
        "securityContext": container_security_context(),
        "volumeMounts": mounts + writable_mounts()[0],
    }


def pod_template(
    container: dict, configmap: str, shm_gi: int, labels: dict, gpu: bool, runs_claim: str | None = None
) -> dict:
    """A pod template around `container` with the /dev/shm, recipe, writable and run-storage volumes."""
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}},
        {"name": "recipe", "configMap": {"name": configmap}},
    ]
    if runs_claim:
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": runs_claim}})
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes + writable_mounts()[1],
    }
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def submitter_template(image: str, labels: dict) -> dict:
    """The pod that runs `ray job submit` (KubeRay fills in its command), as locked down as the others;
    it needs the Ray token to reach the Jobs API, and only /tmp to write to."""
    mounts, volumes = writable_mounts(["tmp"])
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": ray_auth_env(),
        "resources": SUBMITTER_RESOURCES,
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    spec = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def network_policy(name: str, namespace: str | None, labels: dict) -> dict:
    """Ingress: Ray pods from each other (any port); the Jobs API from the namespace's pods and the KubeRay
    operator (any namespace). Egress: Ray pods, DNS, HTTPS (S3, W&B). Other S3 ports need a patch."""
    ray_pods = {"podSelector": {"matchLabels": dict(labels)}}
    dashboard = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, namespace, labels),
        "spec": {
            "podSelector": {"matchLabels": dict(labels)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [ray_pods]},
                {"from": [{"podSelector": {}}, operator], "ports": dashboard},
            ],
            "egress": [
                {"to": [ray_pods]},
                {"ports": dns},
                {"ports": [{"protocol": "TCP", "port": 443}]},
            ],
        },
    }


def runs_claim_doc(name: str, namespace: str | None, labels: dict, storage_class: str | None) -> dict:
    """The ReadWriteMany claim every Ray pod mounts at RUNS_DIR (checkpoints survive the pods)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": RUNS_SIZE}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(name, namespace, labels),
        "spec": spec,
    }


def is_shared(storage_path: str) -> bool:
    """s3:// (or another remote scheme), or a path on the shared claim at RUNS_DIR."""
    if is_remote(storage_path):
        return True
    path = storage_path.removeprefix("file://").rstrip("/")
    return path == RUNS_DIR or path.startswith(f"{RUNS_DIR}/")


def plan_storage(recipe: Recipe) -> list[str]:
    """Recipe overrides that put checkpoints on shared storage: none for s3://, else the claim's path."""
    return [] if is_shared(recipe.cluster.storage_path) else [f"cluster.storage_path={RUNS_DIR}"]


def check_storage(recipe: Recipe) -> None:
    """Raise ValueError (one line, naming the key) for checkpoints on pod-local disk."""
    path = recipe.cluster.storage_path
    if not is_shared(path):
        raise ValueError(
            f"cluster.storage_path '{path}' is on pod-local disk, lost with the pod: use s3://BUCKET/PATH "
            f"or a path under {RUNS_DIR} (the ReadWriteMany claim every Ray pod mounts)"
        )


def _metadata(name: str, namespace: str | None, labels: dict) -> dict:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def cluster_spec(
    recipe: Recipe,
    image: str,
    workers: int,
    gpus_per_worker: int,
    configmap: str,
    labels: dict,
    runs_claim: str | None,
) -> dict:
    """The RayJob's `rayClusterSpec`: one head pod + one worker group of `workers` pods, token auth."""
    gpu = gpus_per_worker > 0
    runs = runs_claim is not None
    head_amounts = {"cpu": str(HEAD_CPUS), "memory": f"{HEAD_MEMORY_GI + HEAD_SHM_GI}Gi"}
    head_resources = {"requests": head_amounts, "limits": dict(head_amounts)}
    head = ray_container("ray-head", image, head_resources, False, runs)
    worker_resources, worker_shm = pod_resources(recipe, workers, gpus_per_worker)
    worker = ray_container("ray-worker", image, worker_resources, gpu, runs)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        # KubeRay (>= 1.5.1) authenticates its own Jobs API calls with this Secret's token.
        "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},  # in-cluster only: see network_policy
            "template": pod_template(head, configmap, HEAD_SHM_GI, labels, False, runs_claim),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu" if gpu else "cpu",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": pod_template(worker, configmap, worker_shm, labels, gpu, runs_claim),
            }
        ],
    }


def render_rayjob(
    recipe: Recipe,
    recipe_yaml: str,
    *,
    image: str,
    workers: int,
    gpus_per_worker: int,
    namespace: str | None = None,
    name: str | None = None,
    runs_claim: str = RUNS_CLAIM,
    storage_class: str | None = None,
) -> list[dict]:
    """[ConfigMap with `recipe_yaml`, the ReadWriteMany claim `runs_claim` (unless checkpoints go to
    s3://), NetworkPolicy, RayJob running the recipe on its own cluster of `workers` worker pods]."""
    check_fits(recipe, workers, gpus_per_worker)
    check_storage(recipe)
    if not image:
        raise ValueError("image must be a non-empty image reference")
    if namespace:
        check_namespace(namespace)
    job = k8s_name(name or recipe.name)
    configmap = f"{job}-recipe"
    labels = {"app.kubernetes.io/name": "nuance", "app.kubernetes.io/instance": job}
    on_claim = not is_remote(recipe.cluster.storage_path)
    claim = k8s_name(runs_claim, 253) if on_claim else None
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(configmap, namespace, labels),
            "data": {RECIPE_KEY: recipe_yaml},
        }
    ]
    if claim:  # shared by the namespace's runs (labels without the job): resubmitting resumes
        docs.append(runs_claim_doc(claim, namespace, {"app.kubernetes.io/name": "nuance"}, storage_class))
    docs.append(network_policy(job, namespace, labels))
    rayjob_spec = {
        "entrypoint": ENTRYPOINT,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 300,
        "submitterPodTemplate": submitter_template(image, labels),
        "rayClusterSpec": cluster_spec(recipe, image, workers, gpus_per_worker, configmap, labels, claim),
    }
    meta = _metadata(job, namespace, labels)
    docs.append({"apiVersion": RAY_API_VERSION, "kind": "RayJob", "metadata": meta, "spec": rayjob_spec})
    return docs


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings (the recipe) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict]) -> str:
    """A multi-document YAML stream (`---` between documents), keys in insertion order."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
