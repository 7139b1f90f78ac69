#!/usr/bin/env bash
# The GPU benchmark: one command for a bare machine with an NVIDIA GPU, Python 3.12 and
# a CUDA torch preinstalled, and no network (the device tool's). It installs the wheels
# carried in .gpu_carry/ (scripts/gpu_pack.sh packs them here), makes the PINGU-sized
# model (nnU-Net's planner at 0.8 mm, RANDOM weights: speed figures only), and runs
# scripts/bench_inference.py on real heads (Colin27 at 1 and 0.5 mm, resliced to 0.8 mm
# and to 3 mm slices; MNI152): pingu-dask vs nnUNetv2_predict folder mode vs one call per
# scan, TTA off and on, GPU utilisation sampled, masks compared; then the cost of the
# 5-fold ensemble. Writes the sections bench_gpu and bench_gpu_ensemble of
# docs/benchmarks.md (and copies the page to $OUT when the device tool runs it).
#
#   on the device:  bash scripts/gpu_bench.sh                 (carry: [".gpu_carry"])
#   here, tiny, on the CPU (tests/test_benchmarks.py does):   scripts/gpu_bench.sh --tiny
#
# Sizes for <= 8 minutes on an H200 (10 scans; one call per scan timed on 3); --tiny
# runs the same path with a tiny random model, 2 scans (the ensemble 1), TTA off, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CARRY=${GPU_BENCH_CARRY:-.gpu_carry}
size=pingu device=cuda scans=10 per_case=3 tta=both kinds=colin27_1mm,mni152_1mm,colin27_08mm,colin27_05mm,colin27_3mm
ensemble_scans=10
if [ "${1:-}" = "--tiny" ]; then
    size=tiny device=cpu scans=2 per_case=1 tta=off kinds=colin27_1mm,colin27_3mm
    ensemble_scans=1
fi
started=$(date +%s)

if [ -d "$CARRY/wheels" ] && ! "$PYTHON" -c "import nnunetv2" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$CARRY"/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
reader=SimpleITKIO
if [ -n "${GPU_BENCH_STUB_SITK:-}" ] || ! "$PYTHON" -c "import SimpleITK" 2>/dev/null; then
    export PYTHONPATH=$PWD/scripts/stubs${PYTHONPATH:+:$PYTHONPATH}  # a stand-in: see there
    reader=NibabelIO
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
templates=/usr/share/mricron/templates
[ -d "$CARRY/templates" ] && templates=$CARRY/templates
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" -c "import torch, nnunetv2, distributed; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available())"

common=(--model "$size" --reader "$reader" --inputs real --kinds "$kinds" --device "$device"
        --templates "$templates" --workers 1)
[ -n "${GPU_BENCH_CACHE:-}" ] && common+=(--cache "$GPU_BENCH_CACHE")
"$PYTHON" scripts/bench_inference.py "${common[@]}" --scans "$scans" --tta "$tta" \
    --per-case-scans "$per_case" --section bench_gpu
echo "gpu_bench: main comparison done after $(( $(date +%s) - started )) s"
"$PYTHON" scripts/bench_inference.py "${common[@]}" --scans "$ensemble_scans" --tta off --folds 5 \
    --skip-per-case --section bench_gpu_ensemble
echo "gpu_bench: done after $(( $(date +%s) - started )) s"
if [ -n "${OUT:-}" ]; then
    cp "${PINGU_BENCHMARKS_DOC:-docs/benchmarks.md}" "$OUT/benchmarks.md"
fi
