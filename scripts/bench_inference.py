"""Benchmark: cohort inference throughput, three ways, same model, scans and settings.

    (a) pingu-dask: the three stages on a LocalCluster (separate worker processes)
    (b) nnUNetv2_predict in folder mode (its own preprocessing/export processes)
    (c) nnUNetv2_predict once per scan, as the public BIDS wrappers do

Writes scans/minute, the ratios, per-stage seconds per scan, how busy the inference
slots and the GPU (nvidia-smi) were, which side limits, and the mask agreement between
(a) and (b) per input kind to docs/benchmarks.md (section bench_inference_<device>).

Models: `demo` (the bundled one), `pingu` / `tiny` (scripts/make_bench_model.py:
PINGU-sized or tiny, RANDOM weights: speed figures only), or a model folder. Inputs:
`synthetic` (the demo sites' phantoms) or `real` (Colin27 and MNI152 on the grids of
benchkit.anatomy, repeated to --scans). scripts/gpu_bench.sh runs this on a GPU
machine. Run:

    .venv/bin/python scripts/bench_inference.py [--scans 20] [--tta off|on|both]
        [--device cpu|cuda] [--model demo] [--inputs synthetic] [--per-case-scans N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from benchkit.anatomy import KINDS, real_scans
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.analysis.clusters import clean_mask
from pingu_dask.config import InferenceSettings, PvsClusterRules, available_cores
from pingu_dask.inputs.imaging import voxel_volume
from pingu_dask.inputs.manifest import Scan, load_manifest
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import Model, resolve_model
from pingu_dask.run.local import LocalLayout, local_cluster
from pingu_dask.run.loop import Segmentation, segment_scans
from pingu_dask.run.stages import Pipeline
from pingu_dask.synth.cohort import generate_cohort

SCRIPTS = Path(__file__).resolve().parent
RANDOM = ", **random weights** (scripts/make_bench_model.py: speed figures only)"
#: nnUNetv2_predict's entry point, run by this interpreter (no console script needed).
NNUNET_PREDICT = [
    sys.executable,
    "-c",
    "import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point;"
    " sys.argv[0] = 'nnUNetv2_predict'; predict_entry_point()",
]


class GpuSampler:
    """Mean GPU utilisation (%) while a run goes on, from `nvidia-smi` every 0.5 s.

    Only used with a CUDA device; `mean` stays None where nvidia-smi is missing.
    """

    def __init__(self, active: bool) -> None:
        self.active = active
        self.process: subprocess.Popen | None = None
        self.mean: float | None = None

    def __enter__(self) -> GpuSampler:
        query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"]
        if self.active:
            try:
                self.process = subprocess.Popen(
                    ["nvidia-smi", *query], stdout=subprocess.PIPE, text=True
                )
            except OSError:
                self.process = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is None:
            return
        self.process.terminate()
        output, _ = self.process.communicate()
        values = [float(v) for v in output.split() if v.isdigit()]
        self.mean = float(np.mean(values)) if values else None

    def shown(self, device: str) -> str:
        if self.mean is not None:
            return f"{self.mean:.0f} %"
        return "n/a (no nvidia-smi)" if device.startswith("cuda") else "n/a (cpu)"


def run_dask(
    scans: list[Scan], model: Model, settings: InferenceSettings, workers: int, out: Path
) -> tuple[float, list[dict], GpuSampler]:
    """Seconds, records and GPU sampler of one pingu-dask run."""
    from distributed import Client

    gpu = settings.device.startswith("cuda")
    layout = LocalLayout.for_machine(workers, gpu=gpu, torch_threads=settings.torch_threads)
    with local_cluster(layout=layout) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts, as for a long run
        with GpuSampler(gpu) as sampler:
            started = time.perf_counter()
            records = segment_scans(
                client,
                Segmentation(
                    scans=scans, pipeline=Pipeline(NnUNetModel(model), settings, out), watch=False
                ),
            )
            seconds = time.perf_counter() - started
    assert all(r.status == "ok" for r in records), records
    return seconds, records, sampler


def run(command: list[str], env: dict | None = None) -> None:
    """Run a step of the benchmark; on failure, say which and show its error output."""
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}"
        )


def results_folder(model: Model, root: Path) -> tuple[str, str, str]:
    """Lay the model out as nnU-Net's results folder wants it: (dataset id, trainer, plans)."""
    trainer, plans, _ = model.folder.name.split("__")
    match = re.match(r"Dataset(\d+)_", model.folder.parent.name)
    dataset = match[0] + model.folder.parent.name[len(match[0]) :] if match else "Dataset901_Demo"
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / model.folder.name).symlink_to(model.folder)
    return dataset.split("_")[0].removeprefix("Dataset"), trainer, plans


def nnunet_command(inputs: Path, output: Path, layout: tuple, folds, device: str, tta: bool):
    dataset, trainer, plans = layout
    command = [*NNUNET_PREDICT, "-i", str(inputs), "-o", str(output), "-d", dataset,
               "-tr", trainer, "-p", plans, "-c", "3d_fullres", "-f", *folds,
               "-step_size", "0.5", "-device", device]  # fmt: skip
    return command if tta else [*command, "--disable_tta"]


def make_inputs(args: argparse.Namespace, work: Path) -> tuple[list[Scan], dict[str, str], str]:
    """The cohort's scans, each scan's input kind, and a description."""
    if args.inputs == "synthetic":
        generate_cohort(work / "cohort", args.scans, sites="iso1mm", seed=4242, jobs=2)
        scans = load_manifest(work / "cohort" / "manifest.csv").scans
        description = f"{args.scans} synthetic scans, site iso1mm (128 x 152 x 116 voxels)"
        return scans, {s.scan_id: "iso1mm" for s in scans}, description
    files = real_scans(args.cache / "scans", args.kinds.split(","), args.templates)
    names = list(files)
    scans = [
        Scan(f"{names[i % len(names)]}-{i:03d}", (("t1w", files[names[i % len(names)]]),))
        for i in range(args.scans)
    ]
    kinds = {s.scan_id: s.scan_id.rsplit("-", 1)[0] for s in scans}
    description = f"{args.scans} real heads, in turn: " + ", ".join(
        f"{n} ({KINDS[n][2]})" for n in names
    )
    return scans, kinds, description


def bench_model(args: argparse.Namespace, calibrate: Path | None) -> Model:
    if args.model == "demo":
        return resolve_model("demo")
    if args.model in ("pingu", "tiny"):
        target = args.cache / "models" / f"{args.model}-{args.reader or 'SimpleITKIO'}"
        if not list(target.glob(f"Dataset902_*/*/fold_{args.folds - 1}")):
            command = [sys.executable, str(SCRIPTS / "make_bench_model.py"), str(target),
                       "--size", args.model, "--folds", str(args.folds)]  # fmt: skip
            if args.reader:
                command += ["--reader", args.reader]
            if calibrate is not None:
                command += ["--calibrate-on", str(calibrate)]
            run(command)
        folds = tuple(str(fold) for fold in range(args.folds))
        return resolve_model(next(target.glob("Dataset902_*/*__3d_fullres")), folds)
    return resolve_model(args.model)


def agreement_by_kind(records: list[dict], folder: Path, kinds: dict[str, str]) -> dict:
    """Voxels agreeing, (a) vs (b), per input kind (min over its scans)."""
    by_kind: dict[str, list[float]] = {}
    for record in records:
        ours = np.asarray(nib.load(record.nifti).dataobj)
        # Ours went through the cluster-size filter; put theirs through the same one.
        image = nib.load(folder / f"{record.scan_id}.nii.gz")
        theirs = clean_mask(
            np.asarray(image.dataobj), voxel_volume(image.affine), PvsClusterRules()
        )
        by_kind.setdefault(kinds[record.scan_id], []).append(float((ours == theirs).mean()))
    return by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--tta", choices=("off", "on", "both"), default="off")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="demo", help="demo, pingu, tiny or a model folder")
    parser.add_argument("--folds", type=int, default=1, help="folds of a pingu/tiny model")
    parser.add_argument("--reader", help="pingu/tiny model: the plans' image reader")
    parser.add_argument("--inputs", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--kinds", default=",".join(KINDS), help="real inputs' kinds")
    parser.add_argument("--templates", type=Path, default=Path("/usr/share/mricron/templates"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/pingu-dask/bench")
    parser.add_argument("--per-case-scans", type=int, help="(c) on the first N scans only")
    parser.add_argument("--skip-per-case", action="store_true")
    parser.add_argument("--section", help="docs/benchmarks.md section (default by device)")
    args = parser.parse_args()

    ttas = {"off": [False], "on": [True], "both": [False, True]}[args.tta]
    rows, stage_rows, busy_rows, agreement_rows = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        scans, kinds, description = make_inputs(args, work)
        model = bench_model(args, scans[0].channel("t1w") if args.inputs == "real" else None)
        inputs = work / "inputs"
        inputs.mkdir()
        for scan in scans:
            (inputs / f"{scan.scan_id}_0000.nii.gz").symlink_to(scan.channel("t1w").resolve())
        nnunet_layout = results_folder(model, work / "results")
        env = dict(os.environ, nnUNet_results=str(work / "results"), nnUNet_raw=str(work),
                   nnUNet_preprocessed=str(work))  # fmt: skip
        for tta in ttas:
            tag = f"TTA {'on' if tta else 'off'}"
            best = None
            for workers in args.workers:
                threads = max(1, available_cores() // workers)
                settings = InferenceSettings(
                    tta=tta,
                    device=args.device,
                    torch_threads=None if args.device.startswith("cuda") else threads,
                )
                out = work / f"dask-{workers}-{tta}"
                seconds, records, gpu = run_dask(scans, model, settings, workers, out)
                rows.append((tag, f"(a) pingu-dask, {workers} worker(s)", seconds, gpu))
                for stage in ("preprocess", "predict", "finish"):
                    per_scan = np.mean([r.seconds[stage] for r in records])
                    stage_rows.append((tag, f"{workers} worker(s)", stage, per_scan))
                # Share of the run's wall time the inference slots spent in predict.
                busy = sum(r.seconds["predict"] for r in records) / (seconds * workers)
                busy_rows.append((tag, f"{workers} worker(s)", busy, gpu.shown(args.device)))
                if best is None or seconds < best[0]:
                    best = (seconds, records)
            folder = work / f"folder-{tta}"
            with GpuSampler(args.device.startswith("cuda")) as gpu:
                started = time.perf_counter()
                command = nnunet_command(
                    inputs, folder, nnunet_layout, model.folds, args.device, tta
                )
                run(command, env)
            rows.append((tag, "(b) nnUNetv2_predict, folder mode (-npp 3 -nps 3)",
                         time.perf_counter() - started, gpu))  # fmt: skip
            for kind, values in agreement_by_kind(best[1], folder, kinds).items():
                agreement_rows.append((tag, kind, min(values), len(values)))
            if args.skip_per_case:
                continue
            chosen = scans[: args.per_case_scans] if args.per_case_scans else scans
            with GpuSampler(args.device.startswith("cuda")) as gpu:
                started = time.perf_counter()
                for scan in chosen:
                    single = work / f"single-{tta}" / scan.scan_id
                    single.mkdir(parents=True)
                    (single / f"{scan.scan_id}_0000.nii.gz").symlink_to(scan.channel("t1w"))
                    command = nnunet_command(single, work / f"per-case-{tta}", nnunet_layout,
                                             model.folds, args.device, tta)  # fmt: skip
                    run(command, env)
            per_case = (time.perf_counter() - started) * len(scans) / len(chosen)
            label = "(c) nnUNetv2_predict, one call per scan"
            if len(chosen) < len(scans):
                label += f" (timed on {len(chosen)} scans, scaled)"
            rows.append((tag, label, per_case, gpu))
    write(args, model, description, rows, stage_rows, busy_rows, agreement_rows)


def write(args, model, description, rows, stage_rows, busy_rows, agreement_rows) -> None:
    rate = {(tag, name): args.scans / seconds * 60 for tag, name, seconds, _ in rows}
    ratios = []
    for tag in dict.fromkeys(tag for tag, *_ in rows):
        best = max(v for (t, k), v in rate.items() if t == tag and k.startswith("(a)"))
        folder = next(v for (t, k), v in rate.items() if t == tag and k.startswith("(b)"))
        per_case = next((v for (t, k), v in rate.items() if t == tag and k.startswith("(c)")), None)
        text = f"{tag}: best (a) / (b) **{best / folder:.2f}x**"
        ratios.append(text + (f"; best (a) / (c) **{best / per_case:.2f}x**." if per_case else "."))
    command = " ".join(sys.argv[1:])
    lines = [
        "## Inference throughput: pingu-dask vs nnUNetv2_predict",
        "",
        f"Machine: {machine()}; device {args.device}. Commit {git_revision()}.",
        f"Command: `scripts/bench_inference.py {command}`.",
        f"Cohort: {description}. Model `{model.name}` (folds {', '.join(model.folds)})"
        + (
            ", **random weights** (scripts/make_bench_model.py)"
            if args.model in ("pingu", "tiny")
            else ""
        )
        + ", step 0.5.",
        "",
        "| TTA | method | seconds | scans/min | GPU utilisation (nvidia-smi, mean) |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {tag} | {name} | {seconds:.1f} | {rate[(tag, name)]:.2f} | "
            f"{gpu.shown(args.device)} |"
            for tag, name, seconds, gpu in rows
        ],
        "",
        *ratios,
        "",
        "Per-stage seconds per scan inside pingu-dask (stages overlap across scans):",
        "",
        "| TTA | run | stage | seconds/scan |",
        "|---|---|---|---:|",
        *[f"| {t} | {run} | {stage} | {s:.2f} |" for t, run, stage, s in stage_rows],
        "",
        "Inference slots busy (predict seconds / (wall seconds x workers)) and the GPU's own"
        " utilisation (nvidia-smi, every 0.5 s), and the side that limits (slots busy"
        " >= 90 %: the slot, i.e. the network and the export on the device; else the CPU):",
        "",
        "| TTA | run | slots busy | GPU utilisation | limits |",
        "|---|---|---:|---:|---|",
        *[
            f"| {t} | {run} | {busy:.0%} | {gpu} | {'slot' if busy >= 0.9 else 'CPU side'} |"
            for t, run, busy, gpu in busy_rows
        ],
        "",
        "Mask agreement (a) vs (b), voxels equal after the same cluster-size filter (the"
        " lowest over each kind's scans):",
        "",
        "| TTA | input | voxels agreeing | scans |",
        "|---|---|---:|---:|",
        *[f"| {t} | {kind} | {value:.6f} | {n} |" for t, kind, value, n in agreement_rows],
        "",
        f"Mask agreement (a) vs (b): min {min(v for _, _, v, _ in agreement_rows):.6f} of "
        f"voxels over {args.scans} scans.",
    ]
    text = "\n".join(lines)
    print(text)
    name = args.section or "bench_inference_" + args.device.split(":")[0]
    print(f"written to {write_section(name, text)}")


if __name__ == "__main__":
    main()
