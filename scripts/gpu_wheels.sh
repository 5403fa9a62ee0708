#!/usr/bin/env bash
# Wheels for a lent GPU machine that cannot reach a package index: the packages cotune needs
# that its image lacks, for that machine's Python (3.12, x86-64 Linux), at the versions
# constraints.txt pins (the set the test suite passed with). Run here, where pip reaches the
# index; the machine installs them from .whl/ (scripts/gpu_check.sh does, with --no-index).
#
#   bash scripts/gpu_wheels.sh              # -> .whl/ (git-ignored, ~55 MB: carry it)
#   PYVER=3.11 bash scripts/gpu_wheels.sh   # another Python on the GPU machine
#
# What the image has (the device tool's KINDS.md: torch 2.11 with CUDA, transformers 5.17,
# tokenizers, safetensors, numpy, matplotlib, grpcio, botorch, pytest, pytest-xdist, PyYAML...)
# is not downloaded. The list below is what a bare `import cotune` and the GPU check need
# beyond it, with their own dependencies; peft comes too, since the parity tests compare
# with the 0.21 series exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection crc32c cryptography cffi
          pycparser bitsandbytes peft)
pinned() {  # the version constraints.txt pins for $1 (names compared as pip normalises them)
  local want
  want=$(echo "$1" | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
  while IFS='=' read -r name _ version; do
    [ "$(echo "$name" | tr '_.' '--' | tr '[:upper:]' '[:lower:]')" = "$want" ] && {
      echo "$version"; return 0; }
  done < constraints.txt
  return 1
}
mkdir -p "$DEST"
specs=()
for p in "${PACKAGES[@]}"; do
  if v=$(pinned "$p"); then specs+=("$p==$v"); else specs+=("$p"); fi
done
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
echo "gpu_wheels: ${#specs[@]} packages in $DEST ($(du -sh "$DEST" | cut -f1)): ${specs[*]}"
