"""Atlas regions in a run: which scans get them, what is recorded, and two real runs.

Fast: the pipeline's choice of region source per scan (parcellation, atlas, the
model's labels, none), its fingerprint, run.json's region_sources record and the
sentence printed for scans without regions.

Slow: `pingu-dask run --regions atlas` on Colin27 (1 mm, real head with skull and
neck; Debian mricron-data) and on a synthetic scan without a parcellation: both
get white-matter and basal-ganglia rows with region_source = atlas and tissue
volumes of a brain (the accuracy of those regions is measured by
scripts/bench_atlas.py, not asserted here). The registration runs at 3 mm in this
test (pingu.atlas-resolution-mm) and the PVS masks come from the tiny random-weight
model (conftest), to keep the suite short: the regions, not the masks, are tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pingu_dask.analysis.atlas import AtlasSettings
from pingu_dask.config import InferenceSettings
from pingu_dask.inputs.manifest import Scan, region_sources_note
from pingu_dask.nnunet.engine import nnunet_model
from pingu_dask.run.provenance import region_sources
from pingu_dask.run.stages import Pipeline

TEMPLATES = Path("/usr/share/mricron/templates")
WITH = Scan("with", (("t1w", Path("a.nii.gz")),), parcellation=Path("a_dseg.nii.gz"))
WITHOUT = Scan("without", (("t1w", Path("b.nii.gz")),))


def _pipeline(atlas_for: str) -> Pipeline:
    return Pipeline(nnunet_model("demo"), InferenceSettings(), Path("out"), atlas_for=atlas_for)


def test_each_scan_says_where_its_regions_come_from() -> None:
    assert [_pipeline("none").region_source(s) for s in (WITH, WITHOUT)] == ["synthseg", "none"]
    fallback = _pipeline("missing")
    assert [fallback.region_source(s) for s in (WITH, WITHOUT)] == ["synthseg", "atlas"]
    assert [_pipeline("all").region_source(s) for s in (WITH, WITHOUT)] == ["atlas", "atlas"]
    with pytest.raises(ValueError, match="atlas_for 'some'"):
        _pipeline("some")


def test_atlas_settings_are_part_of_the_fingerprint() -> None:
    fingerprints = {_pipeline(choice).fingerprint() for choice in ("none", "missing", "all")}
    assert len(fingerprints) == 3
    coarse = Pipeline(
        nnunet_model("demo"),
        InferenceSettings(),
        Path("out"),
        atlas_for="missing",
        atlas=AtlasSettings(resolution_mm=3.0),
    )
    assert coarse.fingerprint() != _pipeline("missing").fingerprint()


def test_run_json_counts_atlas_scans_and_the_brain_rule_for_them() -> None:
    record = region_sources([WITH, WITHOUT, WITHOUT], _pipeline("missing"))
    assert record["per_source"] == {"atlas": 2, "synthseg": 1}
    assert record["scans_with_parcellation"] == 1 and record["scans_with_atlas"] == 2
    assert record["scans_without_parcellation"] == 0
    assert record["brain_rule"]["scans_with"] == 3
    assert region_sources_note(record) is None  # every scan has regions and a brain
    plain = region_sources([WITH, WITHOUT, WITHOUT], _pipeline("none"))
    assert region_sources_note(plain) == (
        "2 scans without a parcellation: whole-brain figures only, and no brain rule "
        "(max-outside-brain 0.25 needs a parcellation)"
    )


# --- real runs ------------------------------------------------------------------


@pytest.mark.slow
def test_regions_atlas_on_colin27_and_a_synthetic_scan(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import dask.config
    from click.testing import CliRunner

    from pingu_dask.cli import main
    from pingu_dask.output import tables

    colin = TEMPLATES / "ch2.nii.gz"
    if not colin.is_file():
        pytest.fail(f"{colin} is missing: install the Debian package mricron-data", False)
    synthetic = pd.read_csv(cohort / "manifest.csv").iloc[0]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "scan_id": ["colin27", str(synthetic.scan_id)],
            "site": ["mni", str(synthetic.site)],
            "t1w": [str(colin), str(cohort / synthetic.t1w)],
        }
    ).to_csv(manifest, index=False)
    out = tmp_path / "out"
    arguments = ["run", str(manifest), "--out", str(out), "--model", str(tiny_model), "-w", "1",
                 "--device", "cpu", "--no-tta", "--no-nifti", "--regions", "atlas"]  # fmt: skip
    with dask.config.set({"pingu.atlas-resolution-mm": 3.0}):
        result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    scans = tables.read_table(out, "scans").set_index("scan_id")
    assert scans.status.tolist() == ["ok", "ok"]
    assert set(scans.region_source) == {"atlas"} and scans.brain_rule.all()
    assert scans.icv_mm3.isna().all()  # an atlas gives no intracranial volume
    regions = tables.read_table(out, "regions").set_index(["scan_id", "region"])
    assert set(regions.region_source) == {"atlas"}
    for scan_id in scans.index:  # white-matter and basal-ganglia rows, with tissue
        assert {"white_matter", "basal_ganglia", "whole_brain"} <= set(regions.loc[scan_id].index)
        assert (regions.loc[scan_id, "tissue_volume_mm3"].drop("other") > 0).all()
    # Colin27 is a real head in MNI space: volumes of a brain.
    tissue = regions.loc["colin27", "tissue_volume_mm3"] / 1000  # cm³
    assert 400 < tissue["white_matter"] < 800, tissue.to_dict()
    assert 10 < tissue["basal_ganglia"] < 40, tissue.to_dict()
    assert 1000 < tissue["whole_brain"] < 2000, tissue.to_dict()  # sulcal CSF counts as cortex
    # The phantom's geometric anatomy is not MNI's (its WM and nuclei are not placed
    # like a real brain's; bench_atlas measures it): the atlas finds its brain.
    truth = nib.load(cohort / synthetic.parcellation)
    voxel_cm3 = abs(np.linalg.det(truth.affine[:3, :3])) / 1000
    brain_cm3 = np.count_nonzero(np.asarray(truth.dataobj)) * voxel_cm3
    atlas_brain = regions.loc[(str(synthetic.scan_id), "whole_brain"), "tissue_volume_mm3"]
    assert 0.75 < atlas_brain / 1000 / brain_cm3 < 1.33, (atlas_brain, brain_cm3)
    run = json.loads((out / "run.json").read_text())
    assert run["region_sources"]["scans_with_atlas"] == 2
    assert run["atlas"]["for"] == "all" and run["atlas"]["resolution_mm"] == 3.0
