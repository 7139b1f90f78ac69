"""The per-hemisphere `pvs` region set and the brain rule, on hand-made label maps.

A 44 x 36 x 24 volume, 1 mm voxels: left hemisphere x 2-17, midline (brainstem) x 18-21,
right hemisphere x 22-37, label 0 around it (x 38-43 is outside the brain). Along y, one
3-voxel slab per structure, each holding a known number of PVS tubes per side (8 voxels
along z), so every region's count per side is known. Tubes that cross the brain's edge
at x = 38 test the brain rule: 20 % and exactly 25 % outside stay, 30 % outside goes.
"""

from __future__ import annotations

from pathlib import Path

import dask.config
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pingu_dask.analysis.regions import (
    ASEG,
    ASEG_PVS,
    assign_clusters,
    drop_outside_brain,
    load_region_table,
    outside_brain_shares,
    region_names,
)
from pingu_dask.analysis.scan import MaskAnalysis, Regions, analyse_mask, scan_regions
from pingu_dask.cli import main
from pingu_dask.cli.common import pvs_cluster_rules
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import parts, tables
from pingu_dask.output.files import save_nifti

SHAPE = (44, 36, 24)
LEFT_X, MID_X, RIGHT_X, BRAIN_X_END = (2, 18), (18, 22), (22, 38), 38
BRAIN_Y, BRAIN_Z = (2, 35), (2, 22)
TUBE_Z = (4, 12)  # placed tubes: z 4..11
EDGE_Z = 17  # tubes crossing the brain's edge lie higher, away from the placed ones

# Structure: (left label, right label) in FreeSurferColorLUT numbers (aseg = SynthSeg),
# in slab order along y; tubes placed (left, right) in each.
STRUCTURES = {
    "cerebral_wm": ((2, 41), (3, 1)),
    "caudate": ((11, 50), (1, 2)),
    "putamen": ((12, 51), (2, 0)),
    "pallidum": ((13, 52), (0, 1)),
    "accumbens": ((26, 58), (1, 1)),
    "thalamus": ((10, 49), (2, 1)),
    "hippocampus": ((17, 53), (1, 3)),
    "cerebellum_wm": ((7, 46), (1, 0)),
    "cerebellum_cortex": ((8, 47), (0, 2)),
    "ventral_dc": ((28, 60), (2, 1)),
}
BRAINSTEM = 16
BRAINSTEM_TUBES = 2
EXPECTED = {  # pvs region -> clusters, from the placement above
    "white_matter_left": 3,
    "white_matter_right": 1,
    "basal_ganglia_left": 1 + 2 + 0 + 1,
    "basal_ganglia_right": 2 + 0 + 1 + 1,
    "thalamus_left": 2,
    "thalamus_right": 1,
    "hippocampus_left": 1,
    "hippocampus_right": 3,
    "cerebellum_left": 1 + 0,
    "cerebellum_right": 0 + 2,
    "ventral_dc_left": 2,
    "ventral_dc_right": 1,
    "brainstem": BRAINSTEM_TUBES,
}


def slab(index: int) -> tuple[int, int]:
    """The y range of the index-th structure's slab."""
    start = BRAIN_Y[0] + 3 * index
    return start, start + 3


def extra_slab() -> tuple[int, int]:
    """The slab after the structures: labels only one of aseg / SynthSeg has."""
    return slab(len(STRUCTURES))


def parcellation(numbering: str) -> np.ndarray:
    """The label map. `synthseg`: its last slab is CSF 24 (SynthSeg 2); `aseg`: WM
    hypointensities 77 on the left and corpus callosum 253 on the right (aseg only)."""
    labels = np.zeros(SHAPE, np.int32)
    z = slice(*BRAIN_Z)
    for index, ((left, right), _) in enumerate(STRUCTURES.values()):
        y = slice(*slab(index))
        labels[slice(*LEFT_X), y, z] = left
        labels[slice(*RIGHT_X), y, z] = right
        labels[slice(*MID_X), y, z] = BRAINSTEM
    y = slice(*extra_slab())
    if numbering == "synthseg":
        labels[LEFT_X[0] : RIGHT_X[1], y, z] = 24
    else:
        labels[LEFT_X[0] : MID_X[1], y, z] = 77
        labels[RIGHT_X[0] : RIGHT_X[1], y, z] = 253
    return labels


def tube(mask: np.ndarray, x: int, y: int) -> None:
    mask[x, y, slice(*TUBE_Z)] = 1


def placed_mask() -> np.ndarray:
    """Tubes at x = 4, 7, 10 (left), 24, 27, 30 (right), in the middle of each slab;
    brainstem tubes at x = 20; one tube in the extra slab on each side."""
    mask = np.zeros(SHAPE, np.uint8)
    for index, (_, (n_left, n_right)) in enumerate(STRUCTURES.values()):
        y = slab(index)[0] + 1
        for k in range(n_left):
            tube(mask, LEFT_X[0] + 2 + 3 * k, y)
        for k in range(n_right):
            tube(mask, RIGHT_X[0] + 2 + 3 * k, y)
    for k in range(BRAINSTEM_TUBES):
        tube(mask, 20, slab(2 * k)[0] + 1)
    y = extra_slab()[0] + 1
    tube(mask, 8, y)
    tube(mask, 30, y)
    return mask


EDGE_TUBES = {  # y slab -> (first x, last x + 1): voxels at x >= 38 are outside
    0: (30, 40),  # 10 voxels, 2 outside: 20 % -> kept
    3: (32, 40),  # 8 voxels, 2 outside: exactly 25 % -> kept ("more than" drops)
    6: (31, 41),  # 10 voxels, 3 outside: 30 % -> dropped
}


def with_edge_tubes(mask: np.ndarray) -> np.ndarray:
    mask = mask.copy()
    for index, (start, stop) in EDGE_TUBES.items():
        mask[start:stop, slab(index)[0] + 1, EDGE_Z] = 1
    return mask


def analyse(
    tmp_path: Path, numbering: str, mask: np.ndarray, settings: PvsClusterRules, table=ASEG_PVS
) -> MaskAnalysis:
    """The pipeline's own path: parcellation file -> scan_regions -> analyse_mask."""
    path = save_nifti(tmp_path / f"{numbering}_dseg.nii.gz", parcellation(numbering), np.eye(4))
    scan = Scan("s1", (("t1w", tmp_path / "t1.nii.gz"),), site="A", parcellation=path)
    regions = scan_regions(scan, SHAPE, np.eye(4), table, settings)
    return analyse_mask(mask, np.eye(4), scan, regions, settings, table)


def counts(analysis: MaskAnalysis) -> dict[str, int]:
    rows = analysis.rows.regions
    return {row["region"]: row["n_clusters"] for row in rows}


def outside_column(analysis: MaskAnalysis) -> dict[str, int | None]:
    rows = analysis.rows.regions
    return {row["region"]: row["n_clusters_outside_brain"] for row in rows}


@pytest.mark.parametrize("numbering", ["synthseg", "aseg"])
def test_pvs_regions_count_each_side_as_placed(tmp_path: Path, numbering: str) -> None:
    analysis = analyse(tmp_path, numbering, placed_mask(), PvsClusterRules())
    found = counts(analysis)
    for region, expected in EXPECTED.items():
        assert found[region] == expected, region
    placed = sum(EXPECTED.values()) + 2
    if numbering == "aseg":  # 77 and 253 are WM that aseg does not lateralise
        assert (found["white_matter_unlateralised"], found["other"]) == (2, 0)
    else:  # CSF 24 is in no region, but inside the brain: counted, as `other`
        assert (found["white_matter_unlateralised"], found["other"]) == (0, 2)
    assert found["whole_brain"] == placed
    assert list(found) == [*ASEG_PVS.names, "other", "whole_brain"]
    assert analysis.counts.clusters_outside_brain == 0


@pytest.mark.parametrize("numbering", ["synthseg", "aseg"])
def test_pvs_sides_add_up_to_the_wm_bg_table(tmp_path: Path, numbering: str) -> None:
    """The two built-in sets agree: left + right (+ unlateralised WM) = ASEG's region."""
    per_side = counts(analyse(tmp_path, numbering, placed_mask(), PvsClusterRules()))
    pooled = counts(analyse(tmp_path, numbering, placed_mask(), PvsClusterRules(), ASEG))
    wm = ("white_matter_left", "white_matter_right", "white_matter_unlateralised")
    assert pooled["white_matter"] == sum(per_side[name] for name in wm)
    for region in ("basal_ganglia", "thalamus", "hippocampus", "cerebellum"):
        assert pooled[region] == per_side[f"{region}_left"] + per_side[f"{region}_right"]
    assert pooled["brainstem"] == per_side["brainstem"]
    assert (
        pooled["other"]
        == per_side["other"] + per_side["ventral_dc_left"] + per_side["ventral_dc_right"]
    )  # ventral DC is not in ASEG
    assert pooled["whole_brain"] == per_side["whole_brain"]


def test_table_labels_match_aseg_and_lut() -> None:
    """Every pvs label is in ASEG (or is ventral DC 28 / 60), and the sides are right:
    FreeSurfer's left labels are below 40 and right ones 41-60."""
    aseg_labels = {label for _, group in ASEG.regions for label in group}
    pvs_labels = {label for _, group in ASEG_PVS.regions for label in group}
    assert pvs_labels == aseg_labels | {28, 60}
    for name, group in ASEG_PVS.regions:
        if name.endswith("_left"):
            assert all(label < 40 for label in group), name
        elif name.endswith("_right"):
            assert all(41 <= label <= 60 for label in group), name
    assert dict(ASEG_PVS.regions)["brainstem"] == (16,)
    assert not any("midbrain" in name for name in ASEG_PVS.names)  # no such aseg label
    for spec in ("pvs", "synthseg-pvs", "aseg-pvs", "freesurfer-pvs", "PVS"):
        assert load_region_table(spec) is ASEG_PVS
    assert load_region_table("synthseg") is ASEG


@pytest.mark.parametrize("numbering", ["synthseg", "aseg"])
def test_brain_rule_drops_a_cluster_30_percent_outside(tmp_path: Path, numbering: str) -> None:
    mask = with_edge_tubes(placed_mask())
    analysis = analyse(tmp_path, numbering, mask, PvsClusterRules())
    found = counts(analysis)
    # The 20 % and 25 % tubes stay, in the right-hand regions holding most of their
    # voxels (WM slab 0, pallidum slab 3); the 30 % one (hippocampus slab 6) is gone.
    assert found["white_matter_right"] == EXPECTED["white_matter_right"] + 1
    assert found["basal_ganglia_right"] == EXPECTED["basal_ganglia_right"] + 1
    assert found["hippocampus_right"] == EXPECTED["hippocampus_right"]
    assert found["whole_brain"] == sum(EXPECTED.values()) + 2 + 2
    assert outside_column(analysis) == {
        **{name: None for name in found if name != "whole_brain"},
        "whole_brain": 1,
    }
    assert analysis.counts.clusters_outside_brain == 1
    # The dropped tube is gone from the stored mask and the cluster table too.
    start, stop = EDGE_TUBES[6]
    assert not analysis.mask[start:stop, slab(6)[0] + 1, EDGE_Z].any()
    assert analysis.mask.sum() == mask.sum() - (stop - start)
    clusters = pd.DataFrame(analysis.rows.clusters)
    assert len(clusters) == found["whole_brain"] == analysis.labels.max()
    assert clusters["cluster"].tolist() == list(range(1, len(clusters) + 1))
    assert sorted(clusters["n_voxels"]) == sorted(np.bincount(analysis.labels.ravel())[1:].tolist())


@pytest.mark.parametrize("off", [1.0, None])
def test_brain_rule_off_keeps_both(tmp_path: Path, off: float | None) -> None:
    mask = with_edge_tubes(placed_mask())
    analysis = analyse(tmp_path, "aseg", mask, PvsClusterRules(max_outside_brain=off))
    found = counts(analysis)
    assert found["hippocampus_right"] == EXPECTED["hippocampus_right"] + 1
    assert found["whole_brain"] == sum(EXPECTED.values()) + 2 + 3
    assert outside_column(analysis)["whole_brain"] is None  # not checked
    assert analysis.mask.sum() == mask.sum()


def test_a_stricter_share_drops_more(tmp_path: Path) -> None:
    mask = with_edge_tubes(placed_mask())
    analysis = analyse(tmp_path, "synthseg", mask, PvsClusterRules(max_outside_brain=0.2))
    assert outside_column(analysis)["whole_brain"] == 2  # 25 % and 30 %; 20 % stays


def test_without_a_brain_mask_the_rule_does_not_run() -> None:
    """Hand-made Regions (no brain) and scans without a parcellation count everything."""
    mask = with_edge_tubes(placed_mask())
    scan = Scan("s1", (("t1w", Path("t1.nii.gz")),))
    regions = Regions(ASEG_PVS.index_map(parcellation("aseg")), None)
    for given in (regions, None):
        analysis = analyse_mask(mask, np.eye(4), scan, given, PvsClusterRules(), ASEG_PVS)
        assert counts(analysis)["whole_brain"] == sum(EXPECTED.values()) + 2 + 3
        assert analysis.counts.clusters_outside_brain is None


def test_drop_outside_brain_renumbers_in_order() -> None:
    labels = np.array([[1, 1, 0, 2, 2, 0, 3, 3, 3, 3]], np.uint32)
    brain = np.array([[1, 1, 1, 0, 1, 1, 1, 1, 1, 0]], bool)
    assert outside_brain_shares(labels, 3, brain).tolist() == [0.0, 0.5, 0.25]
    relabelled, kept, dropped = drop_outside_brain(labels, 3, brain, 0.25)
    assert (kept, dropped) == (2, 1)
    assert relabelled.tolist() == [[1, 1, 0, 0, 0, 0, 2, 2, 2, 2]]
    assert relabelled.dtype == labels.dtype
    same, kept, dropped = drop_outside_brain(labels, 3, brain, 0.5)
    assert (kept, dropped) == (3, 0) and same is labels


def test_assign_clusters_by_side() -> None:
    """Majority of voxels decides the side of a cluster crossing the midline."""
    labels = parcellation("aseg")
    codes = ASEG_PVS.index_map(labels)
    clusters = np.zeros(SHAPE, np.uint32)
    y = slab(0)[0] + 1
    clusters[14:20, y, 5] = 1  # 4 voxels left WM, 2 brainstem
    clusters[20:26, y, 8] = 2  # 2 brainstem, 4 right WM
    winners = assign_clusters(clusters, 2, codes, len(ASEG_PVS.regions))
    names = region_names(ASEG_PVS)
    assert [names[code] for code in winners] == ["white_matter_left", "white_matter_right"]


def test_settings_default_config_and_validation() -> None:
    assert PvsClusterRules().max_outside_brain == 0.25
    assert PvsClusterRules.from_config().max_outside_brain == 0.25
    assert PvsClusterRules(max_outside_brain=None) == PvsClusterRules(max_outside_brain=1.0)
    assert not PvsClusterRules(max_outside_brain=None).drops_outside_brain
    with dask.config.set({"pingu.max-outside-brain": None}):
        assert PvsClusterRules.from_config().max_outside_brain == 1.0
    with dask.config.set({"pingu.max-outside-brain": 0.1}):
        assert PvsClusterRules.from_config().max_outside_brain == 0.1
    with pytest.raises(ValueError, match="outside the brain"):
        PvsClusterRules(max_outside_brain=1.5)
    # A run.json from before the rule (no key) gets the default; one with the rule
    # off keeps it off (stored as 1.0, which survives the "None = not given" merge).
    old = {"connectivity": 26, "min_voxels": 6, "min_volume_mm3": 0.0, "exclude_labels": []}
    assert pvs_cluster_rules(None, None, None, None, old).max_outside_brain == 0.25
    off = {**old, "max_outside_brain": 1.0}
    assert pvs_cluster_rules(None, None, None, None, off).max_outside_brain == 1.0
    chosen = pvs_cluster_rules(None, None, None, None, off, max_outside_brain=0.4)
    assert chosen.max_outside_brain == 0.4


def test_cli_offers_the_options() -> None:
    for command in ("run", "evaluate"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "--max-outside-brain" in result.output and "pvs" in result.output


def test_older_region_parts_read_with_the_new_column_as_null(tmp_path: Path) -> None:
    """Parts written before n_clusters_outside_brain existed still read, as null."""
    old_schema = pa.schema(
        [f for f in tables.SCHEMAS["regions"] if f.name != "n_clusters_outside_brain"]
    )
    row = {"scan_id": "old", "region": "whole_brain", "n_clusters": 3, "n_voxels": 30}
    folder = tmp_path / parts.TABLES / "regions"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), folder / "part-0-old.parquet")
    new = {**row, "scan_id": "new", "n_clusters_outside_brain": 1}
    tables.write_part(tmp_path, "regions", tables.to_table("regions", [new]), "1-new")
    frame = tables.read_table(tmp_path, "regions").set_index("scan_id")
    assert frame.loc["new", "n_clusters_outside_brain"] == 1
    assert frame["n_clusters_outside_brain"].isna().to_dict() == {"old": True, "new": False}
    assert frame.loc["old", "n_clusters"] == 3
