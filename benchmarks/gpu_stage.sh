#!/usr/bin/env bash
# Run ON the device machine, from the repo root, once per device call that carries a wheel set
# (.gpuwheels/1, .gpuwheels/2, ... made here by benchmarks/gpu_wheels.sh). Copies the carried files
# into STAGE_DIR (default /root/nuance-wheels, which lasts while the machine stays warm), checking each
# against the MANIFEST that every set holds; once all parts of a split wheel (ray) are there, joins them
# and checks the joined wheel. Idempotent. Prints one line:
#   staged: complete                                  -> STAGE_DIR/COMPLETE written; run gpu_setup.sh
#   staged: K/N files; carry the next set within 30 s (sets still missing: ...)
# Exit 0 in both cases, 1 on a checksum mismatch, 2 when there is no manifest (nothing carried or staged).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SRC=${GPUWHEELS_SRC:-.gpuwheels}
STAGE=${STAGE_DIR:-/root/nuance-wheels}
mkdir -p "$STAGE/parts"

die() { echo "gpu_stage: $1" >&2; exit "${2:-1}"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
fsize() { stat -c %s "$1" 2>/dev/null || echo -1; }

# The manifest: the carried one (all sets hold the same); a different one starts the staging afresh.
carried=""
for m in "$SRC"/[0-9]*/MANIFEST; do
  [ -f "$m" ] || continue
  if [ -z "$carried" ]; then carried=$m
  elif ! cmp -s "$m" "$carried"; then die "$m differs from $carried: sets of different gpu_wheels.sh runs" 2
  fi
done
if [ -n "$carried" ] && ! cmp -s "$carried" "$STAGE/MANIFEST" 2>/dev/null; then
  if [ -f "$STAGE/MANIFEST" ]; then
    echo "gpu_stage: new manifest; discarding the files staged for the old one" >&2
    rm -f "$STAGE"/*.whl "$STAGE"/*.tar.gz "$STAGE"/*.tmp "$STAGE"/COMPLETE "$STAGE"/parts/*
  fi
  cp "$carried" "$STAGE/MANIFEST.tmp" && mv "$STAGE/MANIFEST.tmp" "$STAGE/MANIFEST"
fi
[ -f "$STAGE/MANIFEST" ] || die "no MANIFEST carried (.gpuwheels/N/) nor staged ($STAGE/)" 2

# dest NAME: where a manifest file lives in the staging dir (parts apart, so pip never sees them)
dest() { case "$1" in *.part-*) echo "$STAGE/parts/$1" ;; *) echo "$STAGE/$1" ;; esac; }

total=0 have=0 missing_sets=""
while read -r kind set size sum name; do
  [ "$kind" = file ] || continue
  total=$((total + 1))
  d=$(dest "$name")
  if [ "$(fsize "$d")" != "$size" ]; then
    src="$SRC/$set/$name"
    if [ -f "$src" ]; then
      got=$(sha "$src")
      [ "$got" = "$sum" ] || die "checksum mismatch: $src (sha256 $got, manifest $sum)"
      cp "$src" "$d.tmp" && mv "$d.tmp" "$d"
    fi
  fi
  if [ "$(fsize "$d")" = "$size" ]; then
    have=$((have + 1))
  else
    case " $missing_sets " in *" $set "*) ;; *) missing_sets="$missing_sets $set" ;; esac
  fi
done < "$STAGE/MANIFEST"

# Join split wheels whose parts are all staged
joined=1
while read -r kind size sum wheel parts; do
  [ "$kind" = join ] || continue
  d="$STAGE/$wheel"
  [ "$(fsize "$d")" = "$size" ] && continue
  paths=()
  for p in $parts; do paths+=("$STAGE/parts/$p"); done
  ok=1
  for p in "${paths[@]}"; do [ -f "$p" ] || ok=0; done
  if [ $ok = 0 ]; then joined=0; continue; fi
  cat "${paths[@]}" > "$d.tmp"
  got=$(sha "$d.tmp")
  if [ "$got" != "$sum" ] || [ "$(fsize "$d.tmp")" != "$size" ]; then
    rm -f "$d.tmp" "${paths[@]}"   # the parts go too: carrying their sets again repairs the staging
    die "checksum mismatch: joined $wheel (sha256 $got, manifest $sum); its parts were removed"
  fi
  mv "$d.tmp" "$d"
done < "$STAGE/MANIFEST"

if [ "$have" = "$total" ] && [ $joined = 1 ]; then
  sha "$STAGE/MANIFEST" > "$STAGE/COMPLETE"
  echo "staged: complete"
else
  rm -f "$STAGE/COMPLETE"
  echo "staged: $have/$total files; carry the next set within 30 s (sets still missing:$missing_sets)"
fi
