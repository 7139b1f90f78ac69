"""Synthetic multi-site cohorts with known PVS, for tests, the demo and benchmarks.

Each scan is a different subject (see phantom.py) imaged by one of a few "sites" that
differ the way real scanners do: voxel size and anisotropy, orientation of the stored
grid, noise, bias field, contrast and field of view. A scan comes with a FreeSurfer-
numbered parcellation and the ground-truth PVS mask, both on the scan's own grid.

The folder is laid out like a BIDS dataset with derivatives, so later BIDS input code
can be tested on it:

    OUT/sub-001/anat/sub-001_T1w.nii.gz                    (and _T2w with t2w=True)
    OUT/derivatives/synthseg/sub-001/anat/sub-001_dseg.nii.gz
    OUT/derivatives/truth/sub-001/anat/sub-001_desc-pvs_mask.nii.gz
    OUT/manifest.csv      one row per scan, paths relative to OUT
    OUT/truth_tubes.csv   one row per drawn tube (end points, width, length, voxels)
    OUT/cohort.json       seed, sites and generator settings
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pingu_dask.output.files import atomic_path, save_nifti
from pingu_dask.synth.phantom import (
    CSF,
    LEFT_RIGHT_LABELS,
    NON_BRAIN,
    SCALP,
    SKULL,
    Anatomy,
    Tube,
    place_tubes,
    random_anatomy,
    rasterise_tubes,
)
from pingu_dask.version import __version__


@dataclass(frozen=True)
class Site:
    """How one scanner/protocol images a head."""

    name: str
    spacing: tuple[float, float, float]  # mm along the stored array axes
    axcodes: str  # where each array axis points, e.g. "RAS", "LPS" (nibabel axis codes)
    fov_mm: tuple[float, float, float]  # extent along the stored array axes
    noise: float  # Rician noise sigma, relative to white-matter intensity
    bias: float  # strength of the smooth multiplicative bias field
    grey_white: float  # T1w grey/white intensity ratio (contrast)
    csf_white: float  # T1w CSF/white intensity ratio
    oblique_deg: float  # largest tilt of the grid against the scanner axes


SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site("iso1mm", (1.0, 1.0, 1.0), "RAS", (128, 152, 116), 0.025, 0.10, 0.64, 0.22, 0.0),
        Site("iso08mm", (0.8, 0.8, 0.8), "LAS", (124, 148, 112), 0.040, 0.18, 0.60, 0.18, 4.0),
        Site("axial3mm", (0.9, 0.9, 3.0), "LPS", (132, 156, 120), 0.050, 0.25, 0.70, 0.28, 8.0),
        Site("sag12mm", (1.2, 1.0, 1.0), "LAS", (124, 152, 116), 0.035, 0.15, 0.66, 0.25, 3.0),
    )
}
DEFAULT_SITES = ("iso1mm", "iso08mm", "axial3mm")

# T1w intensities relative to white matter (the site sets grey matter and CSF); on T2w
# fluid is bright and white matter dark. PVS take the CSF value in both.
T1_LEVELS = {
    "wm": 1.0,
    "thalamus": 0.82,
    "caudate": 0.74,
    "putamen": 0.78,
    "pallidum": 0.88,
    "accumbens": 0.72,
    "skull": 0.08,
    "scalp": 0.85,
}
T2_LEVELS = {
    "wm": 0.35,
    "cortex": 0.60,
    "thalamus": 0.45,
    "caudate": 0.55,
    "putamen": 0.50,
    "pallidum": 0.42,
    "accumbens": 0.55,
    "csf": 1.0,
    "skull": 0.05,
    "scalp": 0.45,
}
INTENSITY_SCALE = 1000.0  # stored as int16, white matter ~1000, like many converted scans


@dataclass(frozen=True)
class ScanRecord:
    """What the manifest and the summary need to know about one written scan."""

    scan_id: str
    subject: str
    site: str
    t1w: str
    t2w: str
    parcellation: str
    reference: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    n_pvs_wm: int
    n_pvs_bg: int
    truth_voxels: int


def _intensity_table(site: Site, contrast: str) -> np.ndarray:
    """Lookup array: tissue label -> relative intensity for this site and contrast."""
    table = np.zeros(max(NON_BRAIN) + 1, dtype=np.float32)
    if contrast == "t1w":
        levels = dict(T1_LEVELS, cortex=site.grey_white, csf=site.csf_white)
    else:
        levels = T2_LEVELS
    table[CSF] = levels["csf"]
    table[SKULL] = levels["skull"]
    table[SCALP] = levels["scalp"]
    tissue_of = {
        "cerebral_white_matter": "wm",
        "cerebral_cortex": "cortex",
        "lateral_ventricle": "csf",
    }
    for name, (left, right) in LEFT_RIGHT_LABELS.items():
        table[[left, right]] = levels[tissue_of.get(name, name)]
    return table


def scan_grid(site: Site, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The stored grid of one scan: affine (array axes per `site.axcodes`, slightly oblique)
    and shape, centred near the scanner origin where the head is."""
    spacing = np.asarray(site.spacing, dtype=float)
    sizes = [round(float(f / s)) for f, s in zip(site.fov_mm, spacing, strict=True)]
    shape = (sizes[0], sizes[1], sizes[2])
    orientation = nib.orientations.axcodes2ornt(tuple(site.axcodes))
    linear = np.zeros((3, 3))
    for array_axis, (world_axis, flip) in enumerate(orientation):
        linear[int(world_axis), array_axis] = flip * spacing[array_axis]
    if site.oblique_deg:
        tilt = Rotation.from_euler(
            "xyz", rng.uniform(-1, 1, size=3) * site.oblique_deg, degrees=True
        )
        linear = tilt.as_matrix() @ linear
    centre = (np.asarray(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = rng.normal(0.0, 2.0, size=3) - linear @ centre
    return affine, shape


def render_scan(
    anatomy: Anatomy,
    tubes: list[Tube],
    site: Site,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    contrasts: Sequence[str] = ("t1w",),
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[int]]:
    """Image one subject on one grid: images per contrast, parcellation, truth, tube voxels.

    Tissue partial volume: thick slices are sampled at several depths and averaged,
    then a small Gaussian stands in for the point-spread function. PVS partial volume
    comes from `rasterise_tubes`. Then texture, bias field and Rician noise (the
    magnitude of complex Gaussian noise, as in a real magnitude image).
    """
    spacing = np.asarray(site.spacing)
    depth_samples = np.maximum(1, np.round(spacing / 1.0)).astype(int)
    index = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    offsets = np.stack(
        np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in depth_samples], indexing="ij"), -1
    ).reshape(-1, 3)
    tables = {c: _intensity_table(site, c) for c in contrasts}
    clean = {c: np.zeros(len(index), dtype=np.float32) for c in contrasts}
    for offset in offsets:
        labels = anatomy.labels_at(nib.affines.apply_affine(affine, index + offset))
        for contrast in contrasts:
            clean[contrast] += tables[contrast][labels]
    if len(offsets) > 1:
        labels = anatomy.labels_at(nib.affines.apply_affine(affine, index))
    centre_labels = labels.reshape(shape)
    parcellation = np.where(np.isin(centre_labels, NON_BRAIN), 0, centre_labels).astype(np.int16)

    fraction, tube_voxels = rasterise_tubes(tubes, affine, shape)
    reference = (fraction >= 0.5).astype(np.uint8)

    world = nib.affines.apply_affine(affine, index) / 60.0
    bias_terms = np.concatenate([world, world**2, world[:, [0]] * world[:, [1]]], axis=1)
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    texture *= 0.03 / (texture.std() + 1e-6)
    images = {}
    for contrast in contrasts:
        image = (clean[contrast] / len(offsets)).reshape(shape)
        image = ndimage.gaussian_filter(image, 0.45)
        image = image * (1.0 + texture * (parcellation > 0))
        image = image * (1.0 - fraction) + fraction * tables[contrast][CSF]
        bias = np.exp(site.bias * (bias_terms @ rng.normal(0.0, 1.0, size=bias_terms.shape[1])))
        image = image * bias.reshape(shape).astype(np.float32)
        sigma = site.noise * (1.0 if contrast == "t1w" else 0.6)
        real = image + rng.normal(0.0, sigma, size=shape).astype(np.float32)
        imaginary = rng.normal(0.0, sigma, size=shape).astype(np.float32)
        magnitude = np.sqrt(real**2 + imaginary**2) * INTENSITY_SCALE
        images[contrast] = np.clip(np.round(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)
    return images, parcellation, reference, tube_voxels


def _pvs_counts(rng: np.random.Generator) -> dict[str, int]:
    """PVS burden varies a lot between people: a subject-level factor scales both regions."""
    burden = rng.lognormal(0.0, 0.35)
    return {
        "wm": int(np.clip(round(45 * burden), 10, 120)),
        "bg": int(np.clip(round(12 * burden), 3, 30)),
    }


def make_scan(
    root: Path, index: int, scan_id: str, site: Site, seed: int, t2w: bool
) -> tuple[ScanRecord, list[dict]]:
    """Generate and write one scan; deterministic for (seed, index) whatever the cohort size."""
    rng = np.random.default_rng([seed, index])
    anatomy = random_anatomy(rng)
    affine, shape = scan_grid(site, rng)
    min_gap = max(2.0, 1.2 * max(site.spacing))
    tubes = place_tubes(anatomy, rng, _pvs_counts(rng), min_gap_mm=min_gap)
    contrasts = ("t1w", "t2w") if t2w else ("t1w",)
    images, parcellation, reference, tube_voxels = render_scan(
        anatomy, tubes, site, affine, shape, rng, contrasts
    )
    anat = Path(scan_id) / "anat"
    paths = {
        "t1w": anat / f"{scan_id}_T1w.nii.gz",
        "t2w": anat / f"{scan_id}_T2w.nii.gz",
        "parcellation": Path("derivatives/synthseg") / anat / f"{scan_id}_dseg.nii.gz",
        "reference": Path("derivatives/truth") / anat / f"{scan_id}_desc-pvs_mask.nii.gz",
    }
    for contrast, image in images.items():
        save_nifti(root / paths[contrast], image, affine)
    save_nifti(root / paths["parcellation"], parcellation, affine)
    save_nifti(root / paths["reference"], reference, affine)
    record = ScanRecord(
        scan_id=scan_id,
        subject=scan_id.removeprefix("sub-"),
        site=site.name,
        t1w=paths["t1w"].as_posix(),
        t2w=paths["t2w"].as_posix() if t2w else "",
        parcellation=paths["parcellation"].as_posix(),
        reference=paths["reference"].as_posix(),
        shape=shape,
        spacing=site.spacing,
        n_pvs_wm=sum(1 for t, n in zip(tubes, tube_voxels, strict=True) if t.region == "wm" and n),
        n_pvs_bg=sum(1 for t, n in zip(tubes, tube_voxels, strict=True) if t.region == "bg" and n),
        truth_voxels=int(reference.sum()),
    )
    tube_rows = [
        {
            "scan_id": scan_id,
            "tube": number,
            "region": tube.region,
            "x0": tube.start[0],
            "y0": tube.start[1],
            "z0": tube.start[2],
            "x1": tube.end[0],
            "y1": tube.end[1],
            "z1": tube.end[2],
            "width_mm": tube.width_mm,
            "length_mm": tube.length_mm,
            "truth_voxels": voxels,
        }
        for number, (tube, voxels) in enumerate(zip(tubes, tube_voxels, strict=True), start=1)
    ]
    return record, tube_rows


def parse_sites(names: str | Iterable[str]) -> list[Site]:
    """Site presets from a comma-separated string or a list of names."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SITES]
    if unknown:
        raise ValueError(f"unknown site(s) {', '.join(unknown)}; choose from {', '.join(SITES)}")
    if not names:
        raise ValueError("at least one site is needed")
    return [SITES[n] for n in names]


MANIFEST_COLUMNS = (
    "scan_id",
    "subject",
    "session",
    "site",
    "t1w",
    "t2w",
    "parcellation",
    "reference",
)


def generate_cohort(
    out: str | os.PathLike[str],
    n_scans: int,
    sites: str | Iterable[str] = DEFAULT_SITES,
    seed: int = 0,
    t2w: bool = False,
    jobs: int = 1,
) -> list[ScanRecord]:
    """Write a synthetic cohort of `n_scans` scans to `out`, sites taken in turn.

    Scan i depends only on (seed, i) and its site, so a cohort of 20 starts with the
    same 10 scans as a cohort of 10, and `jobs` processes give the same files as one.
    """
    if n_scans < 1:
        raise ValueError("n_scans must be at least 1")
    site_list = parse_sites(sites)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n_scans)))
    jobs_args = [
        (root, i, f"sub-{i + 1:0{width}d}", site_list[i % len(site_list)], seed, t2w)
        for i in range(n_scans)
    ]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(make_scan, *zip(*jobs_args, strict=True)))
    else:
        results = [make_scan(*args) for args in jobs_args]
    records = [record for record, _ in results]
    _write_csv(
        root / "manifest.csv",
        MANIFEST_COLUMNS if t2w else tuple(c for c in MANIFEST_COLUMNS if c != "t2w"),
        [dict(asdict(r), session="") for r in records],
    )
    tube_rows = [row for _, rows in results for row in rows]
    _write_csv(
        root / "truth_tubes.csv", tuple(tube_rows[0]) if tube_rows else ("scan_id",), tube_rows
    )
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "pingu-dask synthetic PVS cohort",
                "BIDSVersion": "1.9.0",
                "DatasetType": "raw",
                "GeneratedBy": [{"Name": "pingu-dask synth", "Version": __version__}],
            },
            indent=2,
        )
        + "\n"
    )
    (root / "cohort.json").write_text(
        json.dumps(
            {
                "generator": f"pingu-dask {__version__}",
                "seed": seed,
                "n_scans": n_scans,
                "t2w": t2w,
                "sites": {s.name: asdict(s) for s in site_list},
            },
            indent=2,
        )
        + "\n"
    )
    return records


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
