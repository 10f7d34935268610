#!/usr/bin/env bash
# Offline install of nuance's GPU dependencies on the device machine (it has no network).
# Wheels come from .gpuwheels/ (git-ignored; carried into each device run). The image already
# has torch, numpy, transformers, safetensors, huggingface-hub, einops, ninja, py-cpuinfo, ...;
# pip only takes a carried wheel where the installed version does not satisfy a requirement.
# Idempotent and quiet; prints versions at the end. Usage: bash benchmarks/gpu_setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

W=.gpuwheels
[ -d "$W" ] || { echo "gpu_setup: $W/ not found (carry it into the run)" >&2; exit 1; }

export TORCH_CUDA_ARCH_LIST=9.0   # torch's default "9.0a" breaks DeepSpeed's arch parsing
export DS_BUILD_OPS=0             # no prebuilt ops; DeepSpeed JIT-builds any it needs later
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --no-index --find-links "$W" --no-warn-script-location)

# have NAME==VER ... : true when every distribution is installed at exactly that version
have() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}

# setuptools >= 70.1 has bdist_wheel built in (DeepSpeed's sdist build, the PEP 660 editable install)
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 71)' \
  || "${PIP[@]}" "setuptools>=71"
have diffusers==0.42.1 omegaconf==2.4.0 \
  || "${PIP[@]}" diffusers==0.42.1 omegaconf==2.4.0 hjson pydantic
have webdataset==1.0.2 braceexpand==0.1.7 \
  || "${PIP[@]}" webdataset==1.0.2 braceexpand==0.1.7   # data/ (imported by the training loops)
have peft==0.21.2 bitsandbytes==0.50.2 \
  || "${PIP[@]}" peft==0.21.2 bitsandbytes==0.50.2   # LoRA / QLoRA (the `finetune` extra)
have deepspeed==0.19.8 \
  || "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
have nuance==0.1.0 && "$PY" -c 'import nuance.orchestration, nuance.trainers, nuance.data' 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e .

"$PY" - <<'EOF'
from importlib.metadata import version
import torch
names = ["diffusers", "deepspeed", "peft", "bitsandbytes", "omegaconf", "pydantic", "huggingface-hub", "safetensors", "nuance"]
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print(" ".join(f"{n} {version(n)}" for n in names))
EOF
