"""Benchmark: regions from the atlas (pingu_dask.analysis.atlas), dipy against ANTsPy.

Figures, each registration in its own process (so its CPU time and peak memory are its
own; the peak includes building the template labels, ~5 s, once per process):

1. seconds (wall, and CPU time of the process: all its threads) and peak RSS of placing
   the atlas on Colin27 at 1 mm (ch2.nii.gz, whole head) and 0.5 mm (ch2better.nii.gz,
   brain only), per engine, working resolution and with or without the SyN stage;
2. Dice of the atlas's caudate, putamen, pallidum and thalamus against Colin27's AAL
   labels (drawn differently from Desikan-Killiany's: a bound, not a measure);
3. Dice of atlas WM and BG against synthetic phantoms' true parcellations;
4. PVS clusters per region on the phantoms' true PVS masks, with atlas regions and
   with the true parcellation, and the share of clusters whose region differs.

    .venv/bin/python scripts/bench_atlas.py --work /tmp/bench_atlas
        [--methods dipy,ants] [--resolutions 1,2,3] [--phantoms 6] [--threads 2]
        [--skip-colin] [--skip-colin05] [--skip-phantoms] [--no-doc]

The default run takes about 15 minutes on 2 cores. It writes its section of
docs/benchmarks.md (PINGU_BENCHMARKS_DOC names another file).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
from benchkit.benchdoc import git_revision, machine, write_section

from pingu_dask.analysis.clusters import label_clusters
from pingu_dask.analysis.regions import ASEG, assign_clusters, region_names
from pingu_dask.analysis.scan import regions_from_labels
from pingu_dask.config import PvsClusterRules

TEMPLATES = Path("/usr/share/mricron/templates")
AAL_PAIRS = {  # AAL label -> aseg label
    "caudate L": (71, 11), "caudate R": (72, 50), "putamen L": (73, 12),
    "putamen R": (74, 51), "pallidum L": (75, 13), "pallidum R": (76, 52),
    "thalamus L": (77, 10), "thalamus R": (78, 49),
}  # fmt: skip
WM = (2, 41)
BG = (11, 12, 13, 26, 50, 51, 52, 58)
PHANTOM_SITES = ("iso1mm", "iso08mm", "axial3mm")


def peak_rss_mib() -> float:
    """This process's peak resident memory since exec (VmHWM). Not ru_maxrss: Linux
    carries the forking parent's RSS into the child's ru_maxrss across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(image: Path, out: Path, settings: dict, threads: int) -> None:
    """Child process: place the atlas on one image, save the labels, print figures."""
    from pingu_dask.analysis.atlas import AtlasSettings, atlas_parcellation, template_labels

    started = time.perf_counter()
    template_labels()
    build = time.perf_counter() - started
    nifti = nib.load(image)
    data = np.asanyarray(nifti.dataobj).astype(np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    figures: dict = {"template_s": build}
    try:
        labels = atlas_parcellation(data, nifti.affine, AtlasSettings(**settings), threads)
        np.save(out, labels.astype(np.int16))
    except Exception as error:  # reported in the table, the run goes on
        figures["error"] = f"{type(error).__name__}: {error}"
    figures["wall_s"] = time.perf_counter() - wall
    figures["cpu_s"] = time.process_time() - cpu
    figures["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(figures))


def place(image: Path, work: Path, tag: str, settings: dict, threads: int) -> dict:
    """Run one registration in a child process; its figures and labels (or error)."""
    out = work / f"{tag}.npy"
    command = [sys.executable, __file__, "--one", str(image), str(out), json.dumps(settings),
               str(threads)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "crashed"}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    if "error" not in figures:
        figures["labels"] = np.load(out)
        out.unlink()
    print(tag, {k: v for k, v in figures.items() if k != "labels"}, flush=True)
    return figures


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def configurations(methods: list[str], resolutions: list[float]) -> list[tuple[str, dict]]:
    out = []
    for method in methods:
        for resolution in resolutions:
            if method == "ants" and resolution < 2:
                continue  # minutes per scan on 2 cores: not a candidate
            for nonlinear in (False, True):
                name = f"{method} {resolution:g} mm {'affine+SyN' if nonlinear else 'affine'}"
                out.append((name, {"method": method, "resolution_mm": resolution,
                                   "nonlinear": nonlinear}))  # fmt: skip
    return out


def colin_section(
    work: Path, configs: list[tuple[str, dict]], threads: int, half_mm: bool = True
) -> list[str]:
    ch2, better, aal_path = (
        TEMPLATES / n for n in ("ch2.nii.gz", "ch2better.nii.gz", "aal.nii.gz")
    )
    if not ch2.is_file():
        return [f"Colin27 skipped: {ch2} missing (apt-get install mricron-data)."]
    aal = np.asanyarray(nib.load(aal_path).dataobj)
    head = ["setting", "wall s", "CPU s", "peak RSS MiB", *AAL_PAIRS, "mean"]
    rows = []
    for name, settings in configs:
        tag = name.replace(" ", "_").replace("+", "")
        figures = place(ch2, work, f"colin1_{tag}", settings, threads)
        if "error" in figures:
            rows.append([name, figures["error"][:80], *[""] * (len(head) - 2)])
            continue
        labels = figures["labels"]
        scores = [dice(aal == a, labels == b) for a, b in AAL_PAIRS.values()]
        rows.append([name, f"{figures['wall_s']:.1f}", f"{figures['cpu_s']:.1f}",
                     f"{figures['peak_rss_mib']:.0f}", *[f"{s:.2f}" for s in scores],
                     f"{np.mean(scores):.2f}"])  # fmt: skip
    # identity: the atlas taken to Colin27 through the affines (both are in MNI space)
    from pingu_dask.analysis.atlas import template_labels

    labels, affine = template_labels()
    grid = nib.load(ch2)
    moved = nibabel.processing.resample_from_to(
        nib.Nifti1Image(labels.astype(np.int16), affine), grid, order=0
    )
    same = np.asanyarray(moved.dataobj)
    scores = [dice(aal == a, same == b) for a, b in AAL_PAIRS.values()]
    rows.append(["no registration (both MNI)", "", "", "", *[f"{s:.2f}" for s in scores],
                 f"{np.mean(scores):.2f}"])  # fmt: skip
    lines = [
        "### Colin27 1 mm (ch2.nii.gz, whole head): time, memory, Dice against AAL",
        "",
        table(head, rows),
    ]
    if not half_mm:
        return lines
    lines += ["", "### Colin27 0.5 mm (ch2better.nii.gz, brain only, 301x370x316)", ""]
    rows = []
    grid = default_grid(configs)
    for name, settings in configs:
        if settings["resolution_mm"] != grid:
            continue
        tag = name.replace(" ", "_").replace("+", "")
        figures = place(better, work, f"colin05_{tag}", settings, threads)
        if "error" in figures:
            rows.append([name, figures["error"][:80], "", ""])
            continue
        rows.append([name, f"{figures['wall_s']:.1f}", f"{figures['cpu_s']:.1f}",
                     f"{figures['peak_rss_mib']:.0f}"])  # fmt: skip
    lines.append(table(["setting", "wall s", "CPU s", "peak RSS MiB"], rows))
    return lines


def default_grid(configs: list[tuple[str, dict]]) -> float:
    """The working grid the 0.5 mm and phantom parts use: the default (2 mm) when it
    was asked for, else the coarsest asked for (a quick run)."""
    grids = {settings["resolution_mm"] for _, settings in configs}
    return 2.0 if 2.0 in grids else max(grids)


def phantom_section(
    work: Path, configs: list[tuple[str, dict]], threads: int, n_scans: int
) -> list[str]:
    from pingu_dask.synth.cohort import generate_cohort

    cohort = work / "cohort"
    if not (cohort / "manifest.csv").is_file():
        generate_cohort(cohort, n_scans=n_scans, sites=PHANTOM_SITES, seed=11, jobs=2)
    scans = list(csv.DictReader((cohort / "manifest.csv").open()))[:n_scans]
    rules = PvsClusterRules()
    names = region_names(ASEG)
    dice_rows, count_rows = [], []
    grid = default_grid(configs)
    for name, settings in configs:
        if settings["resolution_mm"] != grid:
            continue  # the phantoms are for the default working grid
        tag = name.replace(" ", "_").replace("+", "")
        wm, bg, brain, seconds, failed = [], [], [], [], []
        truth_counts = np.zeros(len(names), dtype=int)
        atlas_counts = np.zeros(len(names), dtype=int)
        moved = total = 0
        for scan in scans:
            image = cohort / scan["t1w"]
            truth = np.asanyarray(nib.load(cohort / scan["parcellation"]).dataobj).astype(int)
            figures = place(image, work, f"phantom_{scan['scan_id']}_{tag}", settings, threads)
            if "error" in figures:
                failed.append(f"{scan['scan_id']} ({scan['site']}): {figures['error'][:60]}")
                continue
            labels = figures["labels"].astype(np.int32)
            seconds.append(figures["wall_s"])
            wm.append(dice(np.isin(labels, WM), np.isin(truth, WM)))
            bg.append(dice(np.isin(labels, BG), np.isin(truth, BG)))
            brain.append(dice(labels > 0, truth > 0))
            mask = np.asanyarray(nib.load(cohort / scan["reference"]).dataobj) > 0
            clusters, n = label_clusters(mask, rules.connectivity)
            by_truth = assign_clusters(
                clusters, n, regions_from_labels(truth, ASEG, rules).codes, len(ASEG.regions)
            )
            by_atlas = assign_clusters(
                clusters, n, regions_from_labels(labels, ASEG, rules).codes, len(ASEG.regions)
            )
            truth_counts += np.bincount(by_truth, minlength=len(names))
            atlas_counts += np.bincount(by_atlas, minlength=len(names))
            moved += int(np.count_nonzero(by_truth != by_atlas))
            total += n
        ok = len(wm)
        dice_rows.append([name, f"{ok}/{len(scans)}",
                          f"{np.mean(seconds):.1f}" if ok else "",
                          *(f"{np.mean(v):.2f} ({np.min(v):.2f}-{np.max(v):.2f})" if ok else ""
                            for v in (wm, bg, brain)),
                          "; ".join(failed)])  # fmt: skip
        shown = ("white_matter", "basal_ganglia", "thalamus", "other")
        count_rows.append([name, f"{total}",
                           *(f"{truth_counts[names.index(r)]} / {atlas_counts[names.index(r)]}"
                             for r in shown),
                           f"{moved / max(total, 1):.0%}"])  # fmt: skip
    return [
        f"### Synthetic phantoms ({len(scans)} scans, sites {', '.join(PHANTOM_SITES)})",
        "",
        "The phantoms' anatomy is geometric (an ellipsoid brain without cerebellum, "
        "ellipsoid nuclei placed unlike MNI's), not MNI-like: an MNI atlas cannot fit their "
        "nuclei, so these figures say whether the atlas lands on the brain, not how well it "
        "finds real basal ganglia.",
        "",
        table(
            [
                "setting",
                "placed",
                "wall s",
                "Dice WM mean (range)",
                "Dice BG",
                "Dice brain",
                "failures",
            ],
            dice_rows,
        ),
        "",
        "PVS clusters of the phantoms' true masks (26-connected, no size filter, no brain "
        "rule) counted per ASEG region with the true parcellation / with the atlas, and the "
        "share of clusters whose region differs:",
        "",
        table(
            [
                "setting",
                "clusters",
                "white_matter",
                "basal_ganglia",
                "thalamus",
                "other",
                "region differs",
            ],
            count_rows,
        ),
    ]


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_atlas"))
    parser.add_argument("--methods", default="dipy,ants")
    parser.add_argument("--resolutions", default="1,2,3", help="working grids in mm")
    parser.add_argument("--phantoms", type=int, default=6, help="synthetic scans")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-colin", action="store_true")
    parser.add_argument("--skip-colin05", action="store_true", help="Colin27 at 1 mm only")
    parser.add_argument("--skip-phantoms", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        image, out, settings, threads = args.one
        run_one(Path(image), Path(out), json.loads(settings), int(threads))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if "ants" in methods:
        try:
            import ants  # noqa: F401
        except ImportError:
            print("antspyx is not installed: ANTs left out", file=sys.stderr)
            methods.remove("ants")
    configs = configurations(methods, [float(r) for r in args.resolutions.split(",")])
    started = time.perf_counter()
    body = [
        "## Atlas regions (template registration)",
        "",
        f"Machine: {machine()}. Commit {git_revision()}.",
        f"Command: `.venv/bin/python scripts/bench_atlas.py --methods {args.methods} "
        f"--resolutions {args.resolutions} --phantoms {args.phantoms} --threads "
        f"{args.threads}`. Each registration runs in its own process with {args.threads} "
        "threads allowed; CPU s is that process's CPU time over all threads (the template "
        "labels, built once per process in ~5 s, are not in the seconds but are in the "
        "peak RSS). Both engines are held to the threads (ITK's for ANTs, threadpoolctl "
        "for dipy's and scipy's OpenMP). Peak RSS is the process's VmHWM.",
        "",
    ]
    if not args.skip_colin:
        body += [*colin_section(args.work, configs, args.threads, not args.skip_colin05), ""]
    if not args.skip_phantoms:
        body += [*phantom_section(args.work, configs, args.threads, args.phantoms), ""]
    body.append(f"Whole benchmark: {(time.perf_counter() - started) / 60:.1f} min.")
    text = "\n".join(body)
    print(text)
    if not args.no_doc:
        print(f"written to {write_section('bench_atlas', text)}")


if __name__ == "__main__":
    main()
