"""Benchmark: what a scan costs outside the network, on real heads, before and after.

For each input kind (Colin27 and MNI152 at 1 mm, Colin27 resliced to 0.8 mm and to
0.9 x 0.9 x 3 mm slices, Colin27 at 0.5 mm) and each model's plans (the bundled demo
model, 1 mm; the PINGU-sized model of scripts/make_bench_model.py, 0.8 mm), the CPU
core-seconds (user + system time of the process, all threads) of:

    nnU-Net     what nnUNetv2_predict's worker processes run: DefaultPreprocessor.run_case
                (read, crop, normalise, resample), export_prediction_from_logits
                (resample the logits, argmax, uncrop, write the mask with SimpleITK)
    before      pingu-dask's stages as at commit afecddf: full read and checks, then
                nnU-Net's run_case (a second read); finish with nnU-Net's export function
                (skimage on the CPU), clusters, Zarr + NIfTI
    after, CPU  this code on a CPU worker: one read, nnU-Net's steps with torch
                resampling in preprocess; the export (torch) in predict; finish
    after, GPU  this code on a GPU worker: preprocess leaves the resampling to the device;
                predict resamples in and out and takes the argmax there; finish. The
                device's part is run here on the CPU and shown apart (not CPU-side work)

The network itself is never run: it is the GPU's part, and every variant gets the same
stand-in logits (float16, a smoothed random field thresholded at 0.2 % of voxels, on the
model's grid), so the export and cluster work are alike. Each variant runs in a fresh
process; its peak RSS (one scan, imports included) is reported. Agreement: the masks of
the "after" variants against nnU-Net's export of the same logits (after the same
cluster-size filter); and, with the demo model's real network, a pingu-dask run against
nnUNetv2_predict on the same scans. Run:

    .venv/bin/python scripts/bench_cpu_side.py [--kinds colin27_1mm,...] [--models demo,pingu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from benchkit.anatomy import KINDS, real_scans
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.analysis.clusters import clean_mask
from pingu_dask.config import InferenceSettings, PvsClusterRules, available_cores
from pingu_dask.inputs.imaging import voxel_volume
from pingu_dask.inputs.manifest import Scan
from pingu_dask.nnunet.engine import NnUNetModel
from pingu_dask.nnunet.model import resolve_model
from pingu_dask.run.stages import Pipeline

SCRIPTS = Path(__file__).resolve().parent
VARIANTS = ("nnunet", "before", "after_cpu", "after_gpu")
LABELS = {
    "nnunet": "nnUNetv2_predict's workers",
    "before": "pingu-dask before (afecddf)",
    "after_cpu": "pingu-dask after, CPU worker",
    "after_gpu": "pingu-dask after, GPU worker",
}
FOREGROUND = 0.002


# --- one variant, in a child process -----------------------------------------------


class Clock:
    """Core-seconds (user + system, all threads) and wall seconds per named step."""

    def __init__(self) -> None:
        self.core: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        self.core[name] = self.core.get(name, 0.0) + cpu
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started


def stand_in_logits(shape: tuple[int, ...], seed: int = 7) -> np.ndarray:
    """Float16 logits (2 classes) of a smooth random field: blobs on ~0.2 % of voxels.
    A stand-in for the network's output (not a model), the same in every variant."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(seed).standard_normal(shape, np.float32), 1.5)
    margin = field - np.quantile(field[::4, ::4, ::4], 1 - FOREGROUND)
    return np.stack([np.zeros_like(margin), margin]).astype(np.float16)


def run_variant(variant: str, model_folder: Path, scan_path: Path, out: Path) -> dict:
    import torch

    from pingu_dask.nnunet import engine
    from pingu_dask.output import layout

    torch.set_num_threads(available_cores())
    model = resolve_model(model_folder)
    scan = Scan(scan_path.name.split(".")[0], (("t1w", scan_path),))
    # The array as stored, as nnU-Net's own code sees it: this compares implementations
    # of nnU-Net's steps on the same input (reorienting is measured by bench_preflight).
    settings = InferenceSettings(
        tta=False, device="cpu", torch_threads=available_cores(), orientation="stored"
    )
    pipeline = Pipeline(NnUNetModel(model), settings, out)
    layout.prepare_output(out)
    clock = Clock()
    mask_file = out / "nifti" / f"{scan.scan_id}_desc-pvs_mask.nii.gz"
    if variant == "nnunet":
        nnunet_variant(model, scan_path, out, clock)
        mask_file = out / f"{scan.scan_id}_nnunet.nii.gz"
    elif variant == "before":
        before_variant(pipeline, scan, clock)
    else:
        engine.uses_gpu = lambda device: variant == "after_gpu"  # as on a GPU worker
        after_variant(pipeline, scan, clock)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"core": clock.core, "wall": clock.wall, "peak_mib": peak, "mask": str(mask_file)}


def nnunet_variant(model, scan_path: Path, out: Path, clock: Clock) -> None:
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from pingu_dask.nnunet.plans import model_plan

    plan = model_plan(model)
    with clock.step("preprocess"):
        preprocessor = plan.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case(
            [str(scan_path)], None, plan.plans_manager, plan.configuration, plan.dataset_json
        )
    logits = torch.from_numpy(stand_in_logits(data.shape[1:]))
    target = out / f"{scan_path.name.split('.')[0]}_nnunet"
    with clock.step("finish"):
        export_prediction_from_logits(logits, properties, plan.configuration,
                                      plan.plans_manager, plan.dataset_json, str(target),
                                      num_threads_torch=available_cores())  # fmt: skip


def before_variant(pipeline: Pipeline, scan: Scan, clock: Clock) -> None:
    """The stages as at afecddf (check and read, nnU-Net's run_case; nnU-Net's export)."""
    import torch
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    from pingu_dask.analysis.scan import analyse_mask
    from pingu_dask.inputs.imaging import check_image_data
    from pingu_dask.inputs.manifest import input_fingerprint
    from pingu_dask.nnunet.plans import model_plan
    from pingu_dask.output import masks
    from pingu_dask.output.files import save_nifti

    plan = model_plan(pipeline.model.model)  # the nnU-Net model behind the seam
    with clock.step("preprocess"):
        info, _ = check_image_data(scan.channel("t1w"))
        input_fingerprint(scan)
        preprocessor = plan.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case(
            [str(scan.channel("t1w"))], None, plan.plans_manager, plan.configuration,
            plan.dataset_json,
        )  # fmt: skip
        data = np.ascontiguousarray(data, dtype=np.float32)
    logits = torch.from_numpy(stand_in_logits(data.shape[1:]))
    with clock.step("finish"):
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plan.plans_manager, plan.configuration, plan.label_manager, properties,
            num_threads_torch=available_cores(),
        )  # fmt: skip
        raw = np.asarray(segmentation).transpose(2, 1, 0)
        analysis = analyse_mask(raw, info.affine, scan, None, pipeline.pvs_rules, pipeline.regions)
        masks.write_mask(pipeline.out, scan.scan_id, analysis.mask, info.affine, {})
        save_nifti(pipeline.out / "nifti" / f"{scan.scan_id}.nii.gz", analysis.mask, info.affine)


def after_variant(pipeline: Pipeline, scan: Scan, clock: Clock) -> None:
    """This code's stages; the device's part (predict without the network) apart."""
    import torch

    from pingu_dask.nnunet import case as nnunet_case
    from pingu_dask.nnunet.plans import model_plan
    from pingu_dask.run import stages

    plan = model_plan(pipeline.model.model)  # the nnU-Net model behind the seam
    with clock.step("preprocess"):
        item = stages.preprocess(scan, pipeline)
    geometry = item.case.geometry
    logits = torch.from_numpy(stand_in_logits(geometry.network_shape))
    with clock.step("device"):
        nnunet_case.resample_to_network(plan, item.case, "cpu")  # what the network would see
        labels = nnunet_case._export(plan, logits, geometry)
    predicted = stages.Predicted(scan.scan_id, labels, geometry, item.source, {}, {})
    with clock.step("finish"):
        stages.finish(predicted, scan, pipeline, f"{scan.scan_id}_desc-pvs_mask.nii.gz")


# --- the benchmark -------------------------------------------------------------------


def child(variant: str, model: Path, scan: Path, work: Path) -> dict:
    out = work / f"{model.name[:40]}-{scan.name.split('.')[0]}-{variant}"
    command = [sys.executable, __file__, "--child", variant, str(model), str(scan), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} on {scan.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cleaned(path: str) -> np.ndarray:
    import nibabel as nib

    image = nib.load(path)
    return clean_mask(np.asarray(image.dataobj) > 0, voxel_volume(image.affine), PvsClusterRules())


def pingu_sized_model(cache: Path, scans: dict[str, Path]) -> Path:
    """The PINGU-sized model (random weights), made once into `cache`."""
    folders = sorted(cache.glob("Dataset902_*/*__3d_fullres"))
    if folders:
        return folders[0]
    calibrate = next(iter(scans.values()))
    command = [sys.executable, str(SCRIPTS / "make_bench_model.py"), str(cache),
               "--calibrate-on", str(calibrate)]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return Path(output.strip().splitlines()[-1])


def demo_agreement(scans: dict[str, Path], work: Path) -> list[tuple[str, float, float, float]]:
    """pingu-dask (1 worker, CPU) vs nnUNetv2_predict, the demo model's real network:
    (kind, voxels agreeing, Dice, peak RSS MiB of the worker) per scan."""
    from distributed import Client

    from pingu_dask.run.local import local_cluster
    from pingu_dask.run.loop import Segmentation, segment_scans

    model = resolve_model("demo")
    settings = InferenceSettings(tta=False, device="cpu")
    inputs, results = work / "nnunet_in", work / "nnunet_results" / "Dataset901_PinguDemo"
    inputs.mkdir(parents=True)
    results.mkdir(parents=True)
    (results / model.folder.name).symlink_to(model.folder)
    for kind, path in scans.items():
        (inputs / f"{kind}_0000.nii.gz").symlink_to(path.resolve())
    env = dict(os.environ, nnUNet_results=str(work / "nnunet_results"), nnUNet_raw=str(work),
               nnUNet_preprocessed=str(work))  # fmt: skip
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o",
               str(work / "nnunet_out"), "-d", "901", "-tr", "nnUNetTrainer", "-p",
               "nnUNetPlansDemo", "-c", "3d_fullres", "-f", "all", "-device", "cpu",
               "--disable_tta"]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True)
    rows = []
    with (
        local_cluster(n_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        for kind, path in scans.items():
            client.restart()  # a fresh worker per kind: its peak memory is that scan's
            scan = Scan(kind, (("t1w", path),))
            out = work / f"demo_run_{kind}"
            records = segment_scans(
                client,
                Segmentation(
                    scans=[scan], pipeline=Pipeline(NnUNetModel(model), settings, out), watch=False
                ),
            )
            assert records[0].ok, records
            ours = cleaned(records[0].nifti)
            theirs = cleaned(str(work / "nnunet_out" / f"{kind}.nii.gz"))
            both = np.logical_and(ours, theirs).sum()
            dice = 2 * both / max(1, ours.sum() + theirs.sum())
            peak = max(client.run(peak_rss_mib).values())
            rows.append((kind, float((ours == theirs).mean()), float(dice), peak))
    return rows


def peak_rss_mib() -> float:
    """This process's peak resident memory (run on the worker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--models", default="demo,pingu")
    parser.add_argument("--pingu-model", type=Path, help="default: made once in the cache")
    parser.add_argument("--skip-demo-agreement", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "SCAN", "OUT"))
    args = parser.parse_args()
    if args.child:
        variant, model, scan, out = args.child
        print(json.dumps(run_variant(variant, Path(model), Path(scan), Path(out))))
        return

    kinds = args.kinds.split(",")
    cache = Path.home() / ".cache" / "pingu-dask" / "bench"
    scans = real_scans(cache / "scans", kinds)
    models = {}
    for name in args.models.split(","):
        if name == "demo":
            models[name] = resolve_model("demo").folder
        else:
            models[name] = args.pingu_model or pingu_sized_model(cache / "models", scans)
    rows, agreement = [], []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for model_name, folder in models.items():
            for kind, path in scans.items():
                results = {v: child(v, folder, path, work) for v in VARIANTS}
                rows.append((model_name, kind, results))
                reference = cleaned(results["nnunet"]["mask"])
                for variant in ("after_cpu", "after_gpu"):
                    mask = cleaned(results[variant]["mask"])
                    agreement.append((model_name, kind, variant, float((mask == reference).mean())))
        demo_rows = [] if args.skip_demo_agreement else demo_agreement(scans, work / "demo")
    write(args, rows, agreement, demo_rows, models)


def model_line(name: str, folder: Path) -> str:
    """What the model is: its card (scripts/make_bench_model.py) where it has one."""
    card_file = folder / "model_card.json"
    if not card_file.exists():
        return f"- `{name}`: `{folder.name}`, the bundled demo model (1 mm, trained on phantoms)."
    card = json.loads(card_file.read_text())
    patch = "x".join(map(str, card["patch_size"]))
    return (
        f"- `{name}`: `{folder.name}`, **random weights** (scripts/make_bench_model.py): "
        f"nnU-Net's planner at {card['spacing'][0]} mm, {card['n_stages']} stages, features "
        f"{card['features_per_stage'][0]}-{card['features_per_stage'][-1]}, patch {patch}, "
        f"{card['parameters'] / 1e6:.1f} M parameters, {card['flops_per_patch'] / 1e9:.0f} "
        "GFLOP per patch (forward, convolutions)."
    )


def write(args, rows, agreement, demo_rows, models) -> None:
    cores = available_cores()
    lines = [
        "## CPU side per scan on real heads: before, after, nnUNetv2_predict",
        "",
        f"Machine: {machine()}. Commit {git_revision()}.",
        f"Command: `.venv/bin/python scripts/bench_cpu_side.py --kinds {args.kinds} "
        f"--models {args.models}`.",
        "Core-seconds = user + system CPU time of the process (all threads; torch threads ="
        f" {cores}); each variant in a fresh process; the network is not run (stand-in "
        "float16 logits, the same for every variant); `device` is what a GPU does in "
        "predict (resampling in and out, argmax), timed here on the CPU.",
        "",
        *[model_line(name, folder) for name, folder in models.items()],
        "",
        "| model | input | variant | preprocess core-s | finish core-s | CPU side core-s "
        "| device part, CPU core-s | wall s (pre + finish) | process peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, kind, results in rows:
        for variant in VARIANTS:
            r = results[variant]
            pre, fin = r["core"].get("preprocess", 0.0), r["core"].get("finish", 0.0)
            device = r["core"].get("device")
            cpu_side = pre + fin + (device if variant == "after_cpu" else 0.0)
            wall = r["wall"].get("preprocess", 0.0) + r["wall"].get("finish", 0.0)
            lines.append(
                f"| {model_name} | {KINDS[kind][2]} ({kind}) | {LABELS[variant]} | {pre:.2f} | "
                f"{fin:.2f} | **{cpu_side:.2f}** | "
                f"{'' if device is None else f'{device:.2f}'} | {wall:.2f} | {r['peak_mib']:.0f} |"
            )
    lines += [
        "",
        "CPU side: preprocess + finish, plus the export for a CPU worker (its predict does it"
        " on the CPU); a GPU worker's device part runs on the GPU. nnUNetv2_predict's finish"
        " is its export worker (resampling, argmax, writing the mask).",
        "",
        "Agreement of the masks with nnU-Net's export of the same logits (voxels equal, after"
        " the same cluster-size filter):",
        "",
        "| model | input | variant | voxels agreeing |",
        "|---|---|---|---:|",
        *[f"| {m} | {KINDS[k][2]} ({k}) | {LABELS[v]} | {a:.6f} |" for m, k, v, a in agreement],
    ]
    if demo_rows:
        lines += [
            "",
            "The demo model's real network, a pingu-dask run (1 local worker, CPU, no TTA) "
            "against nnUNetv2_predict (folder mode, same model and scans; both masks through "
            "the same cluster-size filter); the worker's peak RSS (a fresh worker per scan):",
            "",
            "| input | voxels agreeing | Dice of the masks | worker peak RSS MiB |",
            "|---|---:|---:|---:|",
            *[f"| {KINDS[k][2]} ({k}) | {a:.6f} | {d:.4f} | {m:.0f} |" for k, a, d, m in demo_rows],
        ]
    text = "\n".join(lines)
    print(text)
    print(f"written to {write_section('bench_cpu_side', text)}")


if __name__ == "__main__":
    main()
