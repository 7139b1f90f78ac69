"""Benchmark: cohort inference throughput, three ways, same model and settings.

    (a) pingu-dask: the three stages on a LocalCluster (separate worker processes)
    (b) nnUNetv2_predict in folder mode (its own preprocessing/export processes)
    (c) nnUNetv2_predict once per scan, as the public BIDS wrappers do

Writes scans/minute, the ratios, per-stage seconds per scan and the mask agreement
between (a) and (b) to docs/benchmarks.md. Run:

    .venv/bin/python scripts/bench_inference.py [--scans 20] [--tta] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import git_revision, machine, write_section

from pingu_dask.cluster import local_cluster
from pingu_dask.config import ClusterSettings, InferenceSettings, available_cores
from pingu_dask.imaging import voxel_volume
from pingu_dask.manifest import load_manifest
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.postprocess import clean_mask
from pingu_dask.runner import segment_cohort
from pingu_dask.stages import Pipeline
from pingu_dask.synth import generate_cohort

NNUNET_PREDICT = str(Path(sys.executable).parent / "nnUNetv2_predict")


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


def run_dask(manifest: Path, out: Path, settings: InferenceSettings, workers: int) -> tuple:
    """Seconds, records and mean GPU utilisation (None on CPU) of one pingu-dask run."""
    from distributed import Client

    model = resolve_model("demo")
    scans = load_manifest(manifest).scans
    cluster = local_cluster(n_workers=workers, torch_threads=settings.torch_threads)
    with cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts, as for a long run
        with GpuSampler(settings.device.startswith("cuda")) as gpu:
            started = time.perf_counter()
            records = segment_cohort(client, scans, Pipeline(model, settings, out))
            seconds = time.perf_counter() - started
    assert all(r["status"] == "ok" for r in records), records
    return seconds, records, gpu.mean


def nnunet_command(inputs: Path, output: Path, args: argparse.Namespace) -> list[str]:
    command = [
        NNUNET_PREDICT,
        "-i",
        str(inputs),
        "-o",
        str(output),
        "-d",
        "901",
        "-tr",
        "nnUNetTrainer",
        "-p",
        "nnUNetPlansDemo",
        "-c",
        "3d_fullres",
        "-f",
        "all",
        "-step_size",
        "0.5",
        "-device",
        args.device,
    ]
    return command if args.tta else [*command, "--disable_tta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--tta", action="store_true", help="mirroring TTA on (8x cost)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-per-case", action="store_true")
    args = parser.parse_args()

    model = resolve_model("demo")
    rows, stage_rows, busy_rows, notes = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        records = generate_cohort(scratch / "cohort", args.scans, sites="iso1mm", seed=4242, jobs=2)
        manifest = scratch / "cohort" / "manifest.csv"
        inputs = scratch / "inputs"
        inputs.mkdir()
        for record in records:
            (inputs / f"{record.scan_id}_0000.nii.gz").symlink_to(scratch / "cohort" / record.t1w)
        results = scratch / "results" / "Dataset901_PinguDemo"
        results.mkdir(parents=True)
        (results / model.folder.name).symlink_to(model.folder)
        env = dict(
            os.environ,
            nnUNet_results=str(scratch / "results"),
            nnUNet_raw=str(scratch),
            nnUNet_preprocessed=str(scratch),
        )

        dask_runs = {}
        for workers in args.workers:
            threads = max(1, available_cores() // workers)
            settings = InferenceSettings(tta=args.tta, device=args.device, torch_threads=threads)
            seconds, dask_records, gpu_busy = run_dask(
                manifest, scratch / f"dask{workers}", settings, workers
            )
            dask_runs[workers] = (seconds, dask_records)
            rows.append((f"(a) pingu-dask, {workers} worker(s) x {threads} torch threads", seconds))
            for stage in ("preprocess", "predict", "finish"):
                per_scan = np.mean([r["seconds"][stage] for r in dask_records])
                stage_rows.append((f"{workers} worker(s)", stage, per_scan))
            # Share of the run's wall time the inference slots spent in predict.
            slots_busy = sum(r["seconds"]["predict"] for r in dask_records) / (seconds * workers)
            if gpu_busy is not None:
                gpu = f"{gpu_busy:.0f} %"
            else:
                gpu = "n/a (no nvidia-smi)" if args.device.startswith("cuda") else "n/a (cpu)"
            busy_rows.append((f"{workers} worker(s)", slots_busy, gpu))

        started = time.perf_counter()
        subprocess.run(
            nnunet_command(inputs, scratch / "folder", args),
            env=env,
            check=True,
            capture_output=True,
        )
        rows.append(
            (
                "(b) nnUNetv2_predict, folder mode (default -npp 3 -nps 3)",
                time.perf_counter() - started,
            )
        )

        if not args.skip_per_case:
            started = time.perf_counter()
            for record in records:
                single = scratch / "single" / record.scan_id
                single.mkdir(parents=True)
                (single / f"{record.scan_id}_0000.nii.gz").symlink_to(
                    scratch / "cohort" / record.t1w
                )
                subprocess.run(
                    nnunet_command(single, scratch / "per_case", args),
                    env=env,
                    check=True,
                    capture_output=True,
                )
            rows.append(("(c) nnUNetv2_predict, one call per scan", time.perf_counter() - started))

        best_workers = min(dask_runs, key=lambda w: dask_runs[w][0])
        agreement = []
        for record in dask_runs[best_workers][1]:
            ours = np.asarray(nib.load(record["nifti"]).dataobj)
            # Ours went through the cluster-size filter; put theirs through the same one.
            image = nib.load(scratch / "folder" / f"{record['scan_id']}.nii.gz")
            theirs = clean_mask(
                np.asarray(image.dataobj), voxel_volume(image.affine), ClusterSettings()
            )
            agreement.append(float((ours == theirs).mean()))
        notes.append(
            f"Mask agreement (a) vs (b): min {min(agreement):.6f}, "
            f"mean {np.mean(agreement):.6f} of voxels over {len(agreement)} scans."
        )

    rate = {name: args.scans / seconds * 60 for name, seconds in rows}
    best_dask = max(v for k, v in rate.items() if k.startswith("(a)"))
    folder = next(v for k, v in rate.items() if k.startswith("(b)"))
    per_case = next((v for k, v in rate.items() if k.startswith("(c)")), None)
    lines = [
        "## Inference throughput: pingu-dask vs nnUNetv2_predict",
        "",
        f"Machine: {machine()}; device {args.device}. Commit {git_revision()}.",
        f"Command: `.venv/bin/python scripts/bench_inference.py --scans {args.scans}"
        f"{' --tta' if args.tta else ''} --device {args.device}`.",
        f"Cohort: {args.scans} synthetic scans, site iso1mm (128 x 152 x 116 voxels); bundled demo"
        f" model, fold all, step 0.5, TTA {'on' if args.tta else 'off'}.",
        "",
        "| method | seconds | scans/min |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds:.1f} | {rate[name]:.2f} |" for name, seconds in rows],
        "",
        f"Ratio best (a) / (b): **{best_dask / folder:.2f}x**"
        + (f"; best (a) / (c): **{best_dask / per_case:.2f}x**." if per_case else "."),
        "",
        "Per-stage seconds per scan inside pingu-dask (stages overlap across scans):",
        "",
        "| run | stage | seconds/scan |",
        "|---|---|---:|",
        *[f"| {run} | {stage} | {seconds:.2f} |" for run, stage, seconds in stage_rows],
        "",
        "Inference slots busy (predict seconds / (wall seconds x workers)) and the GPU's own"
        " utilisation (nvidia-smi, every 0.5 s):",
        "",
        "| run | slots busy | GPU utilisation |",
        "|---|---:|---:|",
        *[f"| {run} | {busy:.0%} | {gpu} |" for run, busy, gpu in busy_rows],
        "",
        *notes,
    ]
    print("\n".join(lines))
    print(f"written to {write_section('bench_inference_' + args.device, chr(10).join(lines))}")


if __name__ == "__main__":
    main()
