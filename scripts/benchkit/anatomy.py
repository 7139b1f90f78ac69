"""Real T1w heads for the benchmarks: Colin27 and MNI152, and copies on other grids.

Synthetic phantoms cannot show what real heads cost: skull and neck in the field of
view, 0.5 mm grids, real intensities. The real anatomy reachable here:

- Colin27 (Debian package mricron-data): ch2.nii.gz, 1 mm full head (181 x 217 x 181),
  and ch2better.nii.gz, 0.5 mm (301 x 370 x 316);
- MNI152 (ICBM 2009a, 1 mm, 197 x 233 x 189), inside the nilearn package.

`real_scans` writes the input kinds a multi-site cohort has: those files as they are,
and Colin27 resliced onto the demo sites' grids (0.8 mm LAS, and 0.9 x 0.9 x 3 mm LPS
slices), each slightly oblique as the synthetic sites are. A thick slice averages the
head over its thickness (three depths), as a real slice does. No PVS truth comes with
any of them: they are for cost, memory and agreement figures.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy.spatial.transform import Rotation

from pingu_dask.output.files import save_nifti
from pingu_dask.synth.cohort import SITES, Site

COLIN27_FOLDER = Path("/usr/share/mricron/templates")
MNI152_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
#: name -> (source, site to reslice onto or None, the input kind it stands for)
KINDS: dict[str, tuple[str, str | None, str]] = {
    "colin27_1mm": ("colin27_1mm", None, "1 mm"),
    "mni152_1mm": ("mni152_1mm", None, "1 mm"),
    "colin27_08mm": ("colin27_05mm", "iso08mm", "0.8 mm"),
    "colin27_05mm": ("colin27_05mm", None, "0.5 mm"),
    "colin27_3mm": ("colin27_05mm", "axial3mm", "0.9 x 0.9 x 3 mm"),
}
INSTALL = (
    "Colin27: `sudo apt-get install mricron-data` (or scripts/install_test_data.sh); "
    "MNI152: `pip install nilearn`"
)


def template_files(colin27_folder: Path = COLIN27_FOLDER) -> dict[str, Path]:
    """The real heads found on this machine, by name (those missing are left out)."""
    found = {
        "colin27_1mm": colin27_folder / "ch2.nii.gz",
        "colin27_05mm": colin27_folder / "ch2better.nii.gz",
    }
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        found["mni152_1mm"] = package / "datasets" / "data" / MNI152_FILE
    else:
        found["mni152_1mm"] = colin27_folder / MNI152_FILE  # carried beside Colin27
    return {name: path for name, path in found.items() if path.is_file()}


def real_scans(
    folder: Path,
    kinds: Iterable[str] = tuple(KINDS),
    colin27_folder: Path = COLIN27_FOLDER,
    seed: int = 0,
) -> dict[str, Path]:
    """Write (once) and return the scans of the given kinds, by kind name.

    Raises FileNotFoundError naming what to install when a source head is missing.
    """
    sources = template_files(colin27_folder)
    folder.mkdir(parents=True, exist_ok=True)
    scans = {}
    for index, kind in enumerate(kinds):
        source_name, site_name, _ = KINDS[kind]
        if source_name not in sources:
            raise FileNotFoundError(f"{source_name} is not on this machine: {INSTALL}")
        target = folder / f"{kind}.nii.gz"
        if not target.exists():
            if site_name is None:  # absolute: a relative target would resolve from `folder`
                target.symlink_to(sources[source_name].resolve())
            else:
                rng = np.random.default_rng(seed + index)
                reslice(sources[source_name], SITES[site_name], target, rng)
        scans[kind] = target
    return scans


def site_grid(
    image: nib.Nifti1Image, site: Site, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, ...]]:
    """A grid with the site's voxel size, axis order and tilt that covers `image`'s head."""
    spacing = np.asarray(site.spacing, dtype=float)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape[:3]])).reshape(3, -1).T
    world = nib.affines.apply_affine(image.affine, corners)
    centre, extent = world.mean(axis=0), np.ptp(world, axis=0)
    orientation = nib.orientations.axcodes2ornt(tuple(site.axcodes))
    linear = np.zeros((3, 3))
    shape = []
    for array_axis, (world_axis, flip) in enumerate(orientation):
        linear[int(world_axis), array_axis] = flip * spacing[array_axis]
        shape.append(int(np.ceil(extent[int(world_axis)] / spacing[array_axis])))
    if site.oblique_deg:
        tilt = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * site.oblique_deg, degrees=True)
        linear = tilt.as_matrix() @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine, tuple(shape)


def reslice(source: Path, site: Site, target: Path, rng: np.random.Generator) -> Path:
    """`source` resampled onto a site's grid (cubic spline); a slice thicker than twice
    the in-plane size is the mean of the head at three depths through it."""
    loaded: Any = nib.load(source)
    image = nib.Nifti1Image(np.asarray(loaded.dataobj, dtype=np.float32), loaded.affine)
    affine, shape = site_grid(image, site, rng)
    spacing = np.asarray(site.spacing)
    thick = int(np.argmax(spacing))
    depths = (-1 / 3, 0.0, 1 / 3) if spacing[thick] > 2 * spacing.min() else (0.0,)
    slices = []
    for depth in depths:
        shifted = affine.copy()
        shifted[:3, 3] += affine[:3, thick] * depth
        resampled = resample_from_to(image, (shape, shifted), order=3, cval=0.0)
        slices.append(np.asarray(resampled.dataobj, dtype=np.float32))
    data = np.clip(np.mean(slices, axis=0), 0, None)  # no negative spline ringing
    return save_nifti(target, data.astype(np.float32), affine)
