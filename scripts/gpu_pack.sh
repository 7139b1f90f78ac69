#!/usr/bin/env bash
# Pack what scripts/gpu_bench.sh needs on a bare GPU machine with no network (the device
# tool's: Python 3.12 and a CUDA torch preinstalled, nothing else reachable): wheels
# for Python 3.12 of the packages it lacks, at the versions of this project's .venv,
# and the real heads (Colin27, MNI152). Everything goes to .gpu_carry/ (ignored by git;
# name it in the device tool's `carry`). The tree and the wheels must stay under the
# tool's 64 MiB: SimpleITK's wheel alone is 50 MiB, so it stays behind and gpu_bench.sh
# uses scripts/stubs/SimpleITK (a stand-in) with a NibabelIO model.
#
#   scripts/gpu_pack.sh            # then, on the device: bash scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
PIP=".venv/bin/python -m pip"
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/templates"
# What the device's image lacks (its package list: the device tool's KINDS.md), by
# import name in this venv; versions as installed here.
PACKAGES="nnunetv2 dynamic_network_architectures acvl_utils batchgenerators batchgeneratorsv2
nibabel dask distributed zarr numcodecs connected-components-3d donfig google-crc32c blosc2
ndindex tornado tblib zict locket partd yacs graphviz"
PLATFORMS=""
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
    manylinux1_x86_64 manylinux_2_5_x86_64; do
    PLATFORMS="$PLATFORMS --platform $tag"
done
for package in $PACKAGES; do
    version=$($PIP show "$package" 2>/dev/null | awk '/^Version:/ {print $2}')
    spec="$package${version:+==$version}"
    if ! $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp $PLATFORMS -d "$CARRY/wheels" "$spec" \
        2>/dev/null; then
        # pure-Python packages published as source only (acvl-utils): build the wheel here
        $PIP wheel -q --disable-pip-version-check --no-deps -w "$CARRY/wheels" "$spec"
    fi
done
cp /usr/share/mricron/templates/ch2.nii.gz /usr/share/mricron/templates/ch2better.nii.gz \
    "$CARRY/templates/"
# the benchmarks' helpers (scripts/benchkit) find MNI152; a script read from stdin has the
# current folder, not scripts/, on its path
PYTHONPATH=scripts .venv/bin/python - <<'PY'
import shutil
from benchkit.anatomy import MNI152_FILE, template_files
shutil.copy(template_files()["mni152_1mm"], ".gpu_carry/templates/" + MNI152_FILE)
PY
du -sh "$CARRY/wheels" "$CARRY/templates"
total=$(( $(du -sk "$CARRY" | cut -f1) + $(git ls-files -z | xargs -0 du -ck | tail -1 | cut -f1) ))
echo "tree + carry: $((total / 1024)) MiB (limit 64)"
