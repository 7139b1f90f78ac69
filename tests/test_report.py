"""QC pictures and the HTML report.

QC: hand-made volumes with known PVS in white matter and basal ganglia (exact colours,
the same picture whatever the array's orientation). Report: robust outliers on made-up
numbers; a real small run (demo model, `run --qc`, one bad scan) whose report is
checked against its tables and rendered in headless Chromium; and a 10,000-scan
output directory (tables and tiny pictures written directly) to show that the page
stays small and the gallery pages hold every picture.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import absolute_manifest, headless, shown, with_nan_scan
from PIL import Image

from pingu_dask.analysis.evaluate import summarise
from pingu_dask.analysis.regions import ASEG, HEADLINE_REGIONS
from pingu_dask.analysis.scan import Regions, analyse_mask
from pingu_dask.cli import main
from pingu_dask.config import PvsClusterRules
from pingu_dask.errors import ErrorReport
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import layout, ledger, tables
from pingu_dask.report import build as report
from pingu_dask.report import qc

WM, BG = 2, 11  # FreeSurfer labels: cerebral white matter, caudate


def brain() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40 x 44 x 48 image (x, y, z in RAS), basal ganglia low, white matter above,
    one PVS tube in each: (T1w, parcellation, mask)."""
    shape = (40, 44, 48)
    rng = np.random.default_rng(3)
    image = rng.uniform(100, 200, shape).astype(np.float32)
    parcellation = np.zeros(shape, np.int32)
    parcellation[5:35, 5:39, 20:44] = WM
    parcellation[12:28, 15:30, 8:18] = BG
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 22, 32] = 1  # white matter, along x
    mask[20, 18:26, 12] = 1  # basal ganglia, along y
    return image, parcellation, mask


def picture(image, parcellation, mask, affine) -> np.ndarray:
    """The montage's palette indices for one volume (the same path finish takes)."""
    scan = Scan("s1", (("t1w", Path("t1.nii.gz")),), site="siteA")
    regions = Regions(ASEG.index_map(parcellation), None)
    analysis = analyse_mask(mask, affine, scan, regions, PvsClusterRules(min_voxels=1), ASEG)
    sheet = qc.scan_montage(scan, analysis, qc.qc_image(image, affine), regions.codes, ASEG.names)
    return np.asarray(sheet)


def colour_index(region: str) -> int:
    names = ("other", *ASEG.names)
    return qc.GREYS - 1 + names.index(region) + 1


def pairs(pixels: np.ndarray, rows: list[tuple[int, int, int]]):
    """(plain, overlay) panels per slice, cut out as qc documents its layout: under the
    header, one row per kind (axial, coronal) of `count` pairs of `width` x `height`
    pixels, the plain panel GAP pixels before the overlay, pairs PAIR_GAP apart, a
    caption strip under each row. `rows`: (count, width, height) per row."""
    top = qc.HEADER_HEIGHT
    found = []
    for count, width, height in rows:
        x = 0
        for _ in range(count):
            plain = pixels[top : top + height, x : x + width]
            overlay = pixels[top : top + height, x + width + qc.GAP : x + 2 * width + qc.GAP]
            assert plain.shape == overlay.shape == (height, width)
            found.append((plain, overlay))
            x += 2 * width + qc.GAP + qc.PAIR_GAP
        top += height + qc.CAPTION_HEIGHT
    assert pixels.shape[0] == top  # nothing below the documented rows
    return found


def test_the_montage_colours_pvs_by_region_through_bg_and_wm() -> None:
    image, parcellation, mask = brain()
    pixels = picture(image, parcellation, mask, np.eye(4))
    # 1 mm voxels at 2 px/mm: axial slices 40 x 44 mm -> 80 x 88 px, coronal 40 x 48 mm
    # -> 80 x 96 px; three axial slices and one coronal (below), each as a pair.
    assert qc.PX_PER_MM == 2
    found = pairs(pixels, [(3, 80, 88), (1, 80, 96)])
    for plain, overlay in found:
        assert (plain < qc.GREYS).all()  # the plain T1w panel: no overlay colour
        grey = overlay < qc.GREYS  # the overlay panel: the same slice under its colours
        np.testing.assert_array_equal(overlay[grey], plain[grey])
    body = np.concatenate([overlay.ravel() for _, overlay in found])
    assert (body == colour_index("white_matter")).sum() > 20
    assert (body == colour_index("basal_ganglia")).sum() > 20
    assert not (body == colour_index("other")).any()
    colours_anywhere = (pixels[qc.HEADER_HEIGHT :] >= qc.GREYS).sum()
    assert colours_anywhere == (body >= qc.GREYS).sum()  # PVS colours only in overlays
    # The white-matter tube (x 10-19 at y 22, z 32) in the axial slice through it, at
    # 2 x 2 pixels per voxel: columns 20-39, rows from the top (88 - 2 * 23) = 42-43.
    axial_wm = found[2][1]
    tube = np.argwhere(axial_wm == colour_index("white_matter"))
    assert (tube[:, 1].min(), tube[:, 1].max()) == (20, 39)
    assert (tube[:, 0].min(), tube[:, 0].max()) == (42, 43)
    # Axial: the basal ganglia's middle (z 8-17 -> 12), the middle of the white matter
    # above them (z 20-43 -> 31) and half-way; coronal: the basal ganglia's middle
    # (y 15-29 -> 22), which is also where most PVS voxels are.
    axial, coronal = qc.pick_slices(mask > 0, ASEG.index_map(parcellation), ASEG.names)
    assert (axial, coronal) == ([12, 21, 31], [22])


def test_the_montage_is_the_same_whatever_the_array_orientation() -> None:
    image, parcellation, mask = brain()
    reference = picture(image, parcellation, mask, np.eye(4))
    n = image.shape[0]
    flip_x = np.array([[-1, 0, 0, n - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flipped = picture(image[::-1], parcellation[::-1], mask[::-1], flip_x)
    np.testing.assert_array_equal(flipped, reference)
    swap = np.eye(4)[:, [2, 1, 0, 3]]  # array axes (z, y, x): the same brain
    swapped = picture(*(a.transpose(2, 1, 0) for a in (image, parcellation, mask)), swap)
    np.testing.assert_array_equal(swapped, reference)


def test_a_scan_without_pvs_or_parcellation_still_gets_a_picture(tmp_path: Path) -> None:
    image, _, _ = brain()
    qc_image = qc.qc_image(image, np.diag([1.0, 1.0, 3.0, 1.0]))  # 3 mm slices
    assert qc_image.zooms == (1.0, 1.0, 3.0)
    empty = np.zeros(image.shape, np.uint8)
    sheet = qc.montage(qc_image, empty, ("whole_brain",), None, (), "empty", {"whole_brain": 0})
    path = qc.write_png(tmp_path, "empty", sheet)
    assert path == tmp_path / "qc" / "empty.png"
    pixels = np.asarray(Image.open(path))
    assert not (pixels[qc.HEADER_HEIGHT :] >= qc.GREYS).any()
    assert list(tmp_path.joinpath("qc").iterdir()) == [path]
    # Panels are drawn at 2 px per mm at their physical aspect: the two axial slices
    # are 40 x 44 mm (80 x 88 px), the coronal one 40 mm x 48 slices of 3 mm (80 x 288).
    found = pairs(pixels, [(2, 80, 88), (1, 80, 288)])
    assert len(found) == 3
    for plain, overlay in found:
        np.testing.assert_array_equal(plain, overlay)  # no PVS: the overlay adds nothing
        assert (plain != 0).any(axis=0).all() and (plain != 0).any(axis=1).all()
    axial_row = pixels[qc.HEADER_HEIGHT : qc.HEADER_HEIGHT + 88]
    assert (axial_row != 0).any(axis=0).sum() == 4 * 80  # four panels, gaps left black


def made_up_regions(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for site, counts in values.items():
        for i, count in enumerate(counts):
            rows.append(
                {
                    "scan_id": f"{site}-{i}",
                    "site": site,
                    "region": "white_matter",
                    "n_clusters": count,
                    "total_volume_mm3": 10.0 * (i % 3),
                }
            )
    return pd.DataFrame(rows)


def test_robust_outliers_per_site() -> None:
    regions = made_up_regions(
        {"a": [10, 11, 9, 10, 12, 8, 10, 40], "b": [100, 101, 99, 100, 98, 102], "c": [1, 99]}
    )
    outliers = report.robust_outliers(regions)
    # site a: median 10, MAD 1 -> 40 is (40 - 10) / 1.4826 = 20.2 robust SDs out; site b's
    # values are normal for b; site c has too few scans to judge.
    count_flags = outliers[outliers.measure == "n_clusters"]
    assert count_flags.scan_id.tolist() == ["a-7"]
    assert count_flags.robust_z.iloc[0] == pytest.approx(30 / 1.4826)
    assert count_flags.site_median.iloc[0] == 10
    assert outliers[outliers.measure == "total_volume_mm3"].empty  # spread, no outlier
    flat = made_up_regions({"a": [5] * 10})
    assert report.robust_outliers(flat).empty  # no spread: nothing to flag


# -- a real run's report --------------------------------------------------------------


@pytest.fixture(scope="module")
def reported_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reported")
    manifest = absolute_manifest(cohort, root / "good.csv")
    with_nan_scan(manifest, "bad_nan", root, at=3).to_csv(root / "manifest.csv", index=False)
    out = root / "out"
    arguments = ["run", str(root / "manifest.csv"), "--out", str(out), "--model", "demo"]
    arguments += ["--no-tta", "--step-size", "1.0", "--device", "cpu", "--qc", "--no-nifti"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1, result.output  # one scan failed
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    assert f"report: {index.resolve()}" in result.output
    return {"out": out, "index": index, "text": index.read_text(), "root": root}


def cells(text: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'id="{table_id}".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        found = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        rows.append([html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in found])
    return rows


@pytest.mark.slow
def test_report_totals_and_failures_match_the_ledger(reported_run) -> None:
    text, out = reported_run["text"], reported_run["out"]
    summary = ledger.summarise_ledger(out)
    assert shown(text, "n-scans") == "4"
    assert shown(text, "n-done") == str(summary.counts["ok"]) == "3"
    assert shown(text, "n-failed") == str(summary.counts["failed"]) == "1"
    assert shown(text, "n-not-done") == "0"
    failures = re.search(r'id="failures".*?</details>', text, re.S).group(0)
    assert "<b>ImageError</b>: 1 scan(s)" in failures
    assert "bad_nan" in failures and "NaN or infinite" in failures
    run = layout.read_run_json(out)
    provenance = dict((row[0], row[1]) for row in cells_th(text, "provenance-table"))
    assert run["model"]["fingerprint"] in provenance["model fingerprint"]
    assert run["pipeline_fingerprint"] in provenance["pipeline fingerprint"]
    assert "tta=False" in provenance["inference"] and "step_size=1.0" in provenance["inference"]
    assert run["runs"][0]["run_id"] in provenance["runs"]


def cells_th(text: str, table_id: str) -> list[tuple[str, str]]:
    body = re.search(rf'id="{table_id}".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    pairs = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", body, re.S)
    return [(key, html.unescape(re.sub(r"<[^>]+>", " ", value))) for key, value in pairs]


@pytest.mark.slow
def test_report_numbers_match_the_tables(reported_run) -> None:
    text, out = reported_run["text"], reported_run["out"]
    regions = tables.read_table(out, "regions")
    shown_rows = {(row[0], row[1]): row for row in cells(text, "site-summary")}
    for (site, region), group in regions.groupby(["site", "region"]):
        if region not in HEADLINE_REGIONS:
            continue
        row = shown_rows[(site, region)]
        assert int(row[2]) == len(group)
        assert row[3].startswith(f"{group.n_clusters.median():.1f} [")
        assert row[4].startswith(f"{group.total_volume_mm3.median():.1f} [")
    everyone = regions[regions.region == "whole_brain"]
    assert shown_rows[("all", "whole_brain")][3].startswith(f"{everyone.n_clusters.median():.1f}")
    evaluation = summarise(tables.read_table(out, "evaluation"), HEADLINE_REGIONS)
    shown_evaluation = {row[0]: row for row in cells(text, "evaluation-table")}
    dice = evaluation.loc["all", ("whole_brain", "voxel_dice", "mean")]
    assert shown_evaluation["all"][1] == "3"
    assert f"{dice:.2f} (" in shown_evaluation["all"][6]
    stages = {row[0]: row for row in cells(text, "stage-seconds")}
    ledger_rows = tables.read_table(out, "ledger").query("status == 'ok'")
    assert float(stages["predict"][2]) == pytest.approx(
        ledger_rows.seconds_predict.median(), abs=0.006
    )
    assert text.count("data:image/png;base64,") == 2  # distributions and throughput


@pytest.mark.slow
def test_report_pictures_exist_and_the_page_renders_in_chromium(reported_run) -> None:
    text, out, index = reported_run["text"], reported_run["out"], reported_run["index"]
    sources = re.findall(r'<img src="(\.\./qc/[^"]+)"', text)
    done = set(tables.read_table(out, "ledger").query("status == 'ok'").scan_id)
    assert {Path(s).stem for s in sources} == done
    for source in sources:
        path = (index.parent / source).resolve()
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "qc" / "bad_nan.png").exists()
    rendered = headless(index.as_uri(), "--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "pingu-dask report" in rendered.stdout and 'id="gallery"' in rendered.stdout
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    screenshot = reported_run["root"] / "pingu-report.png"
    shot = headless(index.as_uri(), f"--screenshot={screenshot}", "--window-size=1300,2400")
    assert shot.returncode == 0 and screenshot.read_bytes()[:4] == b"\x89PNG"


# -- 10,000 scans ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_report_of_10000_scans_stays_small_and_pages_its_gallery(tmp_path: Path) -> None:
    n = 10_000
    out = tmp_path / "out"
    layout.prepare_output(out)
    ids = [f"sub-{i:05d}" for i in range(n)]
    sites = [("a", "b", "c", "d")[i % 4] for i in range(n)]
    counts = 20 + np.arange(n) % 11  # evenly spread: no scan is beyond 3 MAD...
    counts[[17, 4242]] = 200  # ...but these two
    rows = []
    for region, share in (("white_matter", 0.7), ("basal_ganglia", 0.2), ("whole_brain", 1.0)):
        rows += [
            {"scan_id": i, "subject": i, "session": None, "site": s, "region": region,
             "n_clusters": int(c * share), "n_voxels": int(c * 30), "total_volume_mm3": c * 30.0}
            for i, s, c in zip(ids, sites, counts, strict=True)
        ]  # fmt: skip
    tables.write_part(out, "regions", tables.to_table("regions", rows), "made")
    now = ledger.now()
    attempts = [
        ledger.attempt_row(i, s, ledger.OK, 1, "bulk", now) for i, s in zip(ids, sites, strict=True)
    ]
    tables.write_part(out, "ledger", tables.to_table("ledger", attempts), "made")
    layout.write_json(out / layout.RUN_JSON, json.loads(json.dumps(fake_run_info(n))))
    tiny = Image.new("P", (8, 8))
    (out / "qc").mkdir()
    for scan_id in ids:
        tiny.save(out / "qc" / f"{scan_id}.png")
    index = report.build_report(out)
    text = index.read_text()
    assert len(text.encode()) < 1_000_000
    first = re.findall(r'<img src="\.\./qc/([^"]+)\.png"', text)
    assert len(first) == report.GALLERY_FIRST
    assert first[:2] == ["sub-00017", "sub-04242"]  # outliers first
    pages = sorted(out.glob("report/gallery-*.html"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(pages) == -(-(n - report.GALLERY_FIRST) // report.GALLERY_PAGE)
    everywhere = list(first)
    for page in pages:
        everywhere += re.findall(r'<img src="\.\./qc/([^"]+)\.png"', page.read_text())
    assert sorted(everywhere) == ids
    assert shown(text, "n-done") == str(n) and shown(text, "n-outlier-scans") == "2"


def fake_run_info(n: int) -> dict:
    return {
        "tool": "pingu-dask", "version": "0", "python": "3", "host": "h", "libraries": {},
        "model": {"folder": "m", "name": "m", "folds": ["0"], "checkpoint": "c",
                  "fingerprint": "f"},
        "inference": {}, "clusters": {}, "regions": {"table": "synthseg", "regions": {}},
        "pipeline_fingerprint": "p", "manifest": None, "n_scans": n,
        "runs": [{"run_id": "bulk", "started": "s", "finished": "f", "to_do": n}],
    }  # fmt: skip


def test_a_run_where_nothing_is_done_yet_still_gets_a_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    layout.prepare_output(out)
    failed = ledger.attempt_row(
        "sub-1", "a", ledger.FAILED, 1, "r1", ledger.now(),
        error=ErrorReport(error_type="ImageError", message="preprocess: image is empty"),
    )  # fmt: skip
    tables.write_part(out, "ledger", tables.to_table("ledger", [failed]), "made")
    layout.write_json(out / layout.RUN_JSON, fake_run_info(2))
    text = report.build_report(out).read_text()
    assert shown(text, "n-done") == "0" and shown(text, "n-failed") == "1"
    assert shown(text, "n-not-done") == "1"
    assert "No scan is done yet." in text and "preprocess: image is empty" in text
    assert "No QC pictures" in text
    with pytest.raises(report.ReportError, match="holds no run"):
        report.build_report(tmp_path / "empty")
