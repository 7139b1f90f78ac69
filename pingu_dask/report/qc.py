"""Quality-control pictures: one PNG montage per scan, the PVS mask over the T1w.

Researchers check segmentations by looking. With `--qc`, `finish` writes
OUT/qc/<scan_id>.png: axial slices through the basal ganglia and the centrum
semiovale (white matter) and coronal slices through the basal ganglia and the slice
with most PVS. Each slice is drawn twice, side by side: the plain T1w (the anatomy,
nothing over it) and the same slice with each PVS voxel coloured by the region its
cluster was counted in. Axial pairs make the first row, coronal pairs the second,
each row with a caption strip under it; a header strip gives the scan id and the
counts per region.

Every panel is drawn at PX_PER_MM pixels per millimetre of the scan (2: a 1 mm voxel
is 2 x 2 pixels, a 0.5 mm one 1 x 1), at its physical aspect ratio (a 3 mm slice is
drawn 3 mm tall), in the neurological convention (the patient's left on the left,
anterior or superior at the top) after reorienting to RAS+. A 1 mm head (Colin27,
181 x 217 x 181 mm) gives about 2,200 x 900 pixels. numpy and Pillow only; sizes and
times per picture are in docs/benchmarks.md (scripts/bench_qc.py). `preprocess`
keeps a windowed 8-bit copy of the T1w for this (`QCImage`), so nothing is read
twice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pingu_dask.analysis.regions import HEADLINE_REGIONS
from pingu_dask.output import layout
from pingu_dask.output.files import atomic_path

PX_PER_MM = 2.0  # pixels per millimetre of the scan, across and up, in every panel
GAP = 4  # pixels between a slice's plain T1w panel and its overlay panel
PAIR_GAP = 16  # pixels between one slice's pair and the next
CAPTION_HEIGHT = 18  # the strip under each row of panels, one caption per slice
GREYS = 224  # palette entries for the image; the regions' colours follow
LIGHT = 200  # the palette index captions are drawn in
HEADER_HEIGHT = 42  # two lines: title, legend
SLAB_MM = 5.0  # PVS drawn from this thick a slab around each slice
REGION_COLOURS = {
    "white_matter": (255, 196, 0),
    "basal_ganglia": (0, 214, 255),
    "other": (255, 64, 200),
    "whole_brain": (255, 80, 40),
}
MORE_COLOURS = ((120, 255, 80), (255, 120, 60), (160, 120, 255), (255, 255, 140))


@dataclass
class QCImage:
    """The T1w as the QC montage needs it: windowed to 8 bits, in RAS+ axis order."""

    volume: np.ndarray  # uint8 (x: left->right, y: posterior->anterior, z: inferior->superior)
    orientation: np.ndarray  # nibabel ornt: image array order -> RAS+
    zooms: tuple[float, float, float]  # mm per voxel along x, y, z

    def to_ras(self, array: np.ndarray) -> np.ndarray:
        """Another volume on the image grid (mask, regions) in the same RAS+ order."""
        return nib.orientations.apply_orientation(array, self.orientation)


def qc_image(data: np.ndarray, affine: np.ndarray) -> QCImage:
    """Window the image (0.5th-99.5th percentile of non-zero voxels, all of them, so
    that the picture does not depend on the array's orientation) and reorient it."""
    values = data[data != 0]
    low, high = np.quantile(values, (0.005, 0.995), method="nearest") if values.size else (0, 1)
    scale = 255.0 / max(float(high - low), 1e-6)
    windowed = np.clip((data - low) * scale, 0, 255).astype(np.uint8)
    orientation = nib.orientations.io_orientation(affine)
    spacing = nib.affines.voxel_sizes(affine)
    zooms = [0.0, 0.0, 0.0]
    for axis, (ras_axis, _) in enumerate(orientation):
        zooms[int(ras_axis)] = float(spacing[axis])
    volume = nib.orientations.apply_orientation(windowed, orientation)
    return QCImage(np.ascontiguousarray(volume), orientation, (zooms[0], zooms[1], zooms[2]))


def region_map(
    labels: np.ndarray, cluster_regions: list[str], names: tuple[str, ...]
) -> np.ndarray:
    """Cluster labels -> per-voxel region code (index in `names` + 1; 0: no PVS)."""
    lookup = np.zeros(len(cluster_regions) + 1, dtype=np.uint8)
    position = {name: i + 1 for i, name in enumerate(names)}
    lookup[1:] = [position[name] for name in cluster_regions]
    return lookup[labels]


def pick_slices(
    pvs: np.ndarray, parcels: np.ndarray | None, parcel_names: tuple[str, ...]
) -> tuple[list[int], list[int]]:
    """(axial z, coronal y) indices in RAS+: through the basal ganglia, the centrum
    semiovale, and where PVS are densest. `parcels` are the region table's codes
    (index in `parcel_names` + 1; RegionTable.index_map), None without a parcellation."""
    depth, rows = pvs.shape[2], pvs.shape[1]
    per_z = pvs.sum(axis=(0, 1))
    per_y = pvs.sum(axis=(0, 2))
    densest_z = int(per_z.argmax()) if per_z.any() else depth // 2
    densest_y = int(per_y.argmax()) if per_y.any() else rows // 2

    def centre(code: int | None) -> tuple[int, int] | None:
        if parcels is None or code is None:
            return None
        where = np.nonzero(parcels == code)
        if not where[0].size:
            return None
        return int(np.median(where[2])), int(np.median(where[1]))

    def code_of(name: str) -> int | None:
        return parcel_names.index(name) + 1 if name in parcel_names else None

    basal = centre(code_of("basal_ganglia"))
    if basal is None:
        axial = sorted({densest_z, depth // 2, min(depth - 1, depth // 2 + depth // 6)})
        return axial, sorted({densest_y, rows // 2})
    z_bg, y_bg = basal
    assert parcels is not None  # a basal ganglia centre was found in them
    # The centrum semiovale: the middle of the white matter above the basal ganglia.
    depths = np.nonzero(parcels == code_of("basal_ganglia"))[2].astype(np.float64)
    bg_top = int(np.percentile(depths, 95))
    white = code_of("white_matter")
    wm_z = np.nonzero(parcels[:, :, bg_top + 1 :] == white)[2] if white else np.array([])
    z_wm = bg_top + 1 + int(np.median(wm_z)) if wm_z.size else min(depth - 1, bg_top + 1)
    axial = sorted({z_bg, (z_bg + z_wm) // 2, z_wm})
    coronal = sorted({y_bg, densest_y})
    return axial, coronal


def scan_montage(
    scan, analysis, picture: QCImage, parcels: np.ndarray | None, parcel_names: tuple[str, ...]
):
    """The montage of one analysed scan (analyse.MaskAnalysis), titled with its id,
    site, cluster count and volume, and the counts per region."""
    whole = analysis.counts
    counts = {row["region"]: row["n_clusters"] for row in analysis.rows.regions}
    title = scan.scan_id + (f" ({scan.site})" if scan.site else "")
    title += f": {whole.n_clusters} PVS clusters, {whole.volume_mm3:.0f} mm3"
    regions_of_pvs = region_map(analysis.labels, analysis.cluster_regions, analysis.region_names)
    return montage(
        picture, regions_of_pvs, analysis.region_names, parcels, parcel_names, title, counts
    )


def montage(
    qc: QCImage,
    regions_of_pvs: np.ndarray,
    names: tuple[str, ...],
    parcels: np.ndarray | None,
    parcel_names: tuple[str, ...],
    title: str,
    counts: dict[str, int],
):
    """The montage as a Pillow image. `regions_of_pvs` (codes by `names`, region_map)
    and `parcels` (codes by `parcel_names`, or None) are on the image grid in its own
    array order."""
    from PIL import Image

    pvs = qc.to_ras(regions_of_pvs)
    parcels_ras = qc.to_ras(parcels) if parcels is not None else None
    axial, coronal = pick_slices(pvs > 0, parcels_ras, parcel_names)
    colours = []
    extra = iter(MORE_COLOURS * 4)
    for name in names:
        colours.append(REGION_COLOURS.get(name) or next(extra))
    zx, zy, zz = qc.zooms
    axial_pairs = []
    for z in axial:
        slab, thickness = _slab(pvs, 2, z, zz)
        caption = f"axial {z}: T1w | PVS in {thickness}"
        axial_pairs.append(_pair(qc.volume[:, :, z], slab, zx, zy, caption))
    coronal_pairs = []
    for y in coronal:
        slab, thickness = _slab(pvs, 1, y, zy)
        caption = f"coronal {y}: T1w | PVS in {thickness}"
        coronal_pairs.append(_pair(qc.volume[:, y, :], slab, zx, zz, caption))
    rows = [axial_pairs, coronal_pairs]
    widths = [sum(pair.width for pair in row) + PAIR_GAP * (len(row) - 1) for row in rows]
    heights = [max(pair.height for pair in row) for row in rows]  # captions included
    sheet = Image.new("P", (max(*widths, 640), HEADER_HEIGHT + sum(heights)), 0)
    top = HEADER_HEIGHT
    for row, row_height in zip(rows, heights, strict=True):
        x = 0
        for pair in row:
            sheet.paste(pair, (x, top))
            x += pair.width + PAIR_GAP
        top += row_height
    _header(sheet, title, counts, names)
    # A palette image (greys, then one entry per region) keeps region colours exact and
    # the file ~30 % smaller than RGB.
    greys = [(round(i * 255 / (GREYS - 1)),) * 3 for i in range(GREYS)]
    sheet.putpalette([value for colour in (*greys, *colours) for value in colour])
    return sheet


def _slab(pvs: np.ndarray, axis: int, index: int, spacing_mm: float) -> tuple[np.ndarray, str]:
    """The PVS mask projected through a slab of about SLAB_MM around a slice (PVS are
    thin tubes: a single slice shows only dots of them), and the slab's thickness.
    Where clusters overlap, the highest region code wins (only the colour changes)."""
    half = int(SLAB_MM / 2 // spacing_mm)
    lower, upper = max(0, index - half), min(pvs.shape[axis], index + half + 1)
    slab = np.take(pvs, range(lower, upper), axis=axis).max(axis=axis)
    return slab, f"{(upper - lower) * spacing_mm:g} mm"


def _pair(image, pvs, column_mm: float, row_mm: float, caption: str):
    """One slice as a pair of panels, the plain T1w then the overlay (GAP apart), with
    its caption in a strip beneath (cut to the pair's width: captions never overlap
    the next pair's, nor the image)."""
    from PIL import Image, ImageDraw

    plain = _panel(image, None, column_mm, row_mm)
    overlay = _panel(image, pvs, column_mm, row_mm)
    pair = Image.new("P", (2 * plain.width + GAP, plain.height + CAPTION_HEIGHT), 0)
    pair.paste(plain, (0, 0))
    pair.paste(overlay, (plain.width + GAP, 0))
    ImageDraw.Draw(pair).text((4, plain.height + 2), caption, fill=LIGHT, font=_font())
    return pair


def _panel(image, pvs, column_mm: float, row_mm: float):
    """One slice as palette indices at PX_PER_MM: columns along the first axis, rows
    along the second, top = high; PVS voxels (when `pvs` is given) get their region's
    entry (GREYS + code - 1). Nearest-neighbour scaling: every pixel is a voxel's."""
    from PIL import Image

    indices = (image.T[::-1].astype(np.uint16) * (GREYS - 1) // 255).astype(np.uint8)
    if pvs is not None:
        codes = pvs.T[::-1]
        indices[codes > 0] = GREYS - 1 + codes[codes > 0]
    width = max(1, round(indices.shape[1] * column_mm * PX_PER_MM))
    height = max(1, round(indices.shape[0] * row_mm * PX_PER_MM))
    panel = Image.fromarray(indices, mode="P")
    return panel.resize((width, height), Image.Resampling.NEAREST)


def _header(sheet, title: str, counts: dict[str, int], names) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(sheet)
    font = _font()
    draw.text((6, 3), title, fill=GREYS - 1, font=font)
    x = 6
    for code, name in enumerate(names, start=1):
        if not counts.get(name) and name not in HEADLINE_REGIONS:
            continue
        draw.rectangle((x, 25, x + 10, 35), fill=GREYS - 1 + code)
        label = f"{name.replace('_', ' ')} {counts.get(name, 0)}"
        draw.text((x + 14, 22), label, fill=LIGHT, font=font)
        x += 14 + round(draw.textlength(label, font=font)) + 14


@functools.cache
def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=13)


def write_png(out: Path, scan_id: str, image) -> Path:
    """OUT/qc/<scan_id>.png, written to a temporary name first (never half a file)."""
    folder = Path(out) / layout.QC
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{scan_id}.png"
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", compress_level=6)
    return path
