"""Real anatomy end to end: Colin27 through `pingu-dask run --qc`.

Colin27 (the MNI single-subject T1w template; Debian package mricron-data) at 1 mm
(ch2.nii.gz, full head) and 0.5 mm (ch2better.nii.gz, brain only), segmented with the
demo model by the command line in a subprocess with one worker, as a user runs it.
Synthetic cohorts cannot show what real heads do: skull and neck in the field of
view, a 0.5 mm grid resampled to the model's 1 mm and back, real intensities. (The
demo model was trained on synthetic data: its PVS counts here are not checked.)

The 1 mm scan is stored in LPI voxel order (every array axis reversed, the affine to
match: the same anatomy at the same world coordinates), so that a mask or picture
that ignored the affine would show; the 0.5 mm one is used as Debian ships it (RAS).

Checked: exit 0; each mask has exactly its input's shape and affine; the QC picture
is upright, i.e. its panels are the image resliced by nibabel's as_closest_canonical
(RAS+) with superior (coronal) or anterior (axial) at the top and the patient's left
on the left, and clearly not those slices upside down or mirrored; each slice comes
as a plain T1w panel (no overlay colour in it) beside its overlay panel, both drawn
at qc.PX_PER_MM (>= 2) pixels per millimetre. The run's peak memory is measured from
outside (the pipeline does not record worker memory) and kept, with the time taken,
as test properties (pytest --junitxml shows them).

The data must be installed (`scripts/install_test_data.sh`, run by `make test` and
.ci/run): when it is missing the test fails saying so, it is not skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pingu_dask.report import qc

pytestmark = pytest.mark.slow  # the whole module: see pyproject's markers

TEMPLATES = Path("/usr/share/mricron/templates")
SCANS = {"colin27-1mm": "ch2.nii.gz", "colin27-05mm": "ch2better.nii.gz"}
INSTALL = (
    "install Colin27 with `sudo apt-get install -y mricron-data` (Debian/Ubuntu) or "
    "`sudo scripts/install_test_data.sh`"
)
#: Measures the peak resident memory of a command's processes (the driver and its
#: worker processes: RUSAGE_CHILDREN is the largest of those waited for).
PEAK_RSS = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(json.dumps({'peak_rss_kib': peak}))\n"
    "sys.exit(code)\n"
)


def colin27(name: str) -> Path:
    """A Colin27 file, or a failure that says how to install it (never a skip: the
    suite must not pass without real anatomy)."""
    path = TEMPLATES / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: {INSTALL}", pytrace=False)
    return path


def reversed_axes(source: Path, target: Path) -> Path:
    """`source` stored with every array axis reversed (RAS -> LPI) and the affine to
    match: the same voxels at the same world coordinates."""
    image = nib.load(source)
    flip = np.diag([-1.0, -1.0, -1.0, 1.0])
    flip[:3, 3] = np.array(image.shape[:3]) - 1
    data = np.asanyarray(image.dataobj)[::-1, ::-1, ::-1].copy()
    nib.save(nib.Nifti1Image(data, image.affine @ flip, image.header), target)
    return target


def run_pipeline(manifest: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """`pingu-dask run --qc` with one worker, in a subprocess; (result, peak memory)."""
    command = [str(Path(sys.executable).with_name("pingu-dask")), "run", str(manifest),
               "--out", str(out), "--model", "demo", "--no-tta", "--step-size", "1.0",
               "--device", "cpu", "--workers", "1", "--qc",
               "--dashboard-address", "127.0.0.1:0"]  # fmt: skip
    memory = out.with_name("memory.json")
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(memory), *command],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return result, json.loads(memory.read_text()) if memory.is_file() else {}


def windowed(data: np.ndarray) -> np.ndarray:
    """The intensity window qc documents (0.5th-99.5th percentile of non-zero voxels),
    so that the comparison tests the geometry, not the contrast."""
    low, high = np.quantile(data[data != 0], (0.005, 0.995))
    return np.clip(data, low, high)


def render(section: np.ndarray, width: int, height: int) -> np.ndarray:
    """A RAS+ slice drawn as qc documents (first axis across, second up), at its size."""
    upright = np.ascontiguousarray(section.T[::-1], dtype=np.float32)
    picture = Image.fromarray(upright, mode="F").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(picture)


def correlation(panel: np.ndarray, expected: np.ndarray) -> float:
    """Pearson correlation over the panel's image pixels (not PVS colours)."""
    grey = panel < qc.GREYS
    a, b = panel[grey].astype(float), expected[grey]
    return float(np.corrcoef(a, b)[0, 1])


def panels(png: Path, canonical: nib.Nifti1Image, mask: np.ndarray):
    """(kind, index, RAS+ slice, plain pixels, overlay pixels) per slice, found as qc
    documents its layout: the slices qc.pick_slices chooses for this mask (no
    parcellation here), a row of axial pairs then a row of coronal pairs under the
    header, each row followed by a caption strip; a pair is the plain panel, GAP
    pixels, the overlay panel; pairs PAIR_GAP apart; every panel at PX_PER_MM of the
    slice's size in mm (computed here from the canonical image, not taken from qc)."""
    sheet = np.asarray(Image.open(png))
    nx, ny, nz = canonical.shape[:3]
    zx, zy, zz = (float(z) for z in canonical.header.get_zooms()[:3])
    axial, coronal = qc.pick_slices(mask > 0, None, ())
    data = windowed(np.asanyarray(canonical.dataobj).astype(np.float32))
    rows = [
        [("axial", z, data[:, :, z], nx * zx, ny * zy) for z in axial],
        [("coronal", y, data[:, y, :], nx * zx, nz * zz) for y in coronal],
    ]
    top = qc.HEADER_HEIGHT
    for row in rows:
        height = 0
        x = 0
        for kind, index, section, width_mm, height_mm in row:
            width, height = round(width_mm * qc.PX_PER_MM), round(height_mm * qc.PX_PER_MM)
            plain = sheet[top : top + height, x : x + width]
            right = x + width + qc.GAP
            overlay = sheet[top : top + height, right : right + width]
            assert overlay.shape == (height, width), (png.name, kind, index, overlay.shape)
            yield kind, index, section, plain, overlay
            x = right + width + qc.PAIR_GAP
        top += height + qc.CAPTION_HEIGHT
    assert sheet.shape[0] == top, f"{png.name}: {sheet.shape[0]} rows, the layout gives {top}"


def assert_upright(png: Path, scan: Path, mask_path: Path) -> dict[str, float]:
    """Every panel is its canonical slice drawn upright (superior or anterior at the
    top, the patient's left on the left), and clearly not the same slice upside down
    or mirrored; the plain panel has no overlay colour; returns the correlations with
    the upright slices, per panel."""
    assert qc.PX_PER_MM >= 2
    canonical = nib.as_closest_canonical(nib.load(scan))
    mask = np.asanyarray(nib.as_closest_canonical(nib.load(mask_path)).dataobj)
    found = {}
    for kind, index, section, plain, overlay in panels(png, canonical, mask):
        where = f"{png.name}, {kind} slice {index}"
        assert (plain < qc.GREYS).all(), f"{where}: the plain T1w panel has overlay colours"
        for name, pixels in (("plain", plain), ("overlay", overlay)):
            height, width = pixels.shape
            upright = correlation(pixels, render(section, width, height))
            upside_down = correlation(pixels, render(section[:, ::-1], width, height))
            mirrored = correlation(pixels, render(section[::-1], width, height))  # left-right
            assert upright > 0.99, f"{where} ({name}) is not the canonical slice: {upright:.3f}"
            assert upright > max(upside_down, mirrored) + 0.1, (
                f"{where} ({name}): upright {upright:.3f}, upside down {upside_down:.3f}, "
                f"mirrored {mirrored:.3f}"
            )
            found[f"{kind} {index} {name}"] = round(upright, 4)
    return found


def test_colin27_end_to_end_at_1mm_and_05mm(tmp_path: Path, record_property) -> None:
    inputs = {
        "colin27-1mm": reversed_axes(colin27(SCANS["colin27-1mm"]), tmp_path / "ch2_lpi.nii.gz"),
        "colin27-05mm": colin27(SCANS["colin27-05mm"]),
    }
    manifest = tmp_path / "manifest.csv"
    lines = ["scan_id,t1w", *(f"{scan_id},{path}" for scan_id, path in inputs.items())]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    started = time.perf_counter()
    result, memory = run_pipeline(manifest, out)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peak_mib = memory["peak_rss_kib"] / 1024
    record_property("seconds", round(seconds, 1))
    record_property("peak_rss_mib", round(peak_mib))
    print(f"Colin27 1 mm + 0.5 mm: {seconds:.0f} s, peak RSS {peak_mib:.0f} MiB")
    assert 0 < peak_mib < 16 * 1024
    for scan_id, path in inputs.items():
        image = nib.load(path)
        mask_path = out / "nifti" / f"{scan_id}_desc-pvs_mask.nii.gz"
        mask = nib.load(mask_path)
        assert mask.shape == image.shape, scan_id
        assert np.allclose(mask.affine, image.affine), scan_id
        record_property(f"{scan_id}_pvs_voxels", int(np.count_nonzero(mask.dataobj)))
        png = out / "qc" / f"{scan_id}.png"
        assert png.is_file(), scan_id
        record_property(f"{scan_id}_qc_correlation", assert_upright(png, path, mask_path))
