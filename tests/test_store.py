"""The output directory: Zarr masks, Parquet tables, NIfTI names, open_results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

import pingu_dask
from pingu_dask.analysis.regions import ASEG
from pingu_dask.analysis.scan import Regions, analyse_mask
from pingu_dask.config import PvsClusterRules
from pingu_dask.inputs.manifest import Scan
from pingu_dask.output import layout, masks, parts, tables

# Array axis 0 runs along -x (a flipped, LAS-like grid), 0.8 mm in-plane, 2 mm slices.
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def make_scan(scan_id: str, site: str, subject: str | None = None, session: str | None = None):
    return Scan(scan_id, (("t1w", Path(f"{scan_id}.nii.gz")),), subject, session, site)


def fake_mask(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask with a few 8-voxel tubes and a parcellation (left half WM, right half BG)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((48, 40, 20), np.uint8)
    for _ in range(4 + seed):
        i, j, k = rng.integers(2, 38), rng.integers(2, 38), rng.integers(2, 18)
        mask[i : i + 8, j, k] = 1
    parcellation = np.full(mask.shape, 11, np.int32)
    parcellation[:24] = 2
    return mask, parcellation


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory written the way the pipeline writes it (three scans)."""
    out = tmp_path_factory.mktemp("out")
    layout.prepare_output(out)
    scans = [make_scan("s1", "A", "01"), make_scan("s2", "A", "02"), make_scan("s3", "B")]
    with tables.TableWriter(out, tables.FlushEvery(scans=2)) as writer:
        for seed, scan in enumerate(scans):
            mask, parcellation = fake_mask(seed)
            regions = Regions(ASEG.index_map(parcellation), None)
            analysis = analyse_mask(mask, AFFINE, scan, regions, PvsClusterRules(), ASEG)
            masks.write_mask(out, scan.scan_id, analysis.mask, AFFINE, {"model_fingerprint": "abc"})
            writer.add(tables.scan_tables(analysis.rows))
    layout.write_json(out / layout.RUN_JSON, {"tool": "pingu-dask", "n_scans": 3})
    return out


def test_masks_zarr_layout_and_attributes(out: Path) -> None:
    root = zarr.open_group(out / layout.MASKS, mode="r")
    assert sorted(root.group_keys()) == ["s1", "s2", "s3"]
    assert root.attrs["layout"] == layout.LAYOUT_VERSION
    group = root["s1"]
    array = group["pvs"]
    assert array.dtype == np.uint8 and array.shape == (48, 40, 20)
    assert array.metadata.zarr_format == 3
    codec = json.dumps(array.metadata.to_dict())
    assert '"cname": "zstd"' in codec and '"shuffle": "bitshuffle"' in codec
    assert group.attrs["complete"] is True
    assert np.allclose(group.attrs["affine"], AFFINE)
    assert group.attrs["spacing"] == pytest.approx([0.8, 0.8, 2.0])
    assert group.attrs["model_fingerprint"] == "abc"
    # One shard file per mask, not one file per chunk.
    assert len(list((out / layout.MASKS / "s1" / "pvs" / "c").rglob("*"))) >= 1
    assert len([p for p in (out / layout.MASKS / "s1").rglob("*") if p.is_file()]) == 3


def test_a_rewritten_mask_is_incomplete_until_done(out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    layout.prepare_output(copy)
    mask, _ = fake_mask(0)
    masks.write_mask(copy, "x", mask, AFFINE, {})
    assert masks.read_mask(copy, "x")[0].sum() == mask.sum()
    group = zarr.open_group(copy / layout.MASKS / "x", mode="r+")
    group.attrs.update({"complete": False})  # what a crash in the middle of a rewrite leaves
    with pytest.raises(KeyError, match="no complete mask for scan 'x'"):
        masks.read_mask(copy, "x")
    assert masks.mask_attrs(copy, "nowhere") is None


def test_tables_have_fixed_schemas_and_are_written_in_parts(out: Path) -> None:
    for name in ("regions", "clusters"):
        found = sorted((out / parts.TABLES / name).iterdir())
        assert len(found) == 2  # every 2 scans, then the rest at close
        assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in found)
        assert pq.read_schema(found[0]).remove_metadata().equals(tables.SCHEMAS[name])
    regions = tables.read_table(out, "regions")
    assert len(regions) == 3 * (len(ASEG.names) + 2)  # each region, other, whole_brain
    assert set(regions["site"]) == {"A", "B"}
    whole = regions[regions.region == "whole_brain"].set_index("scan_id")
    clusters = tables.read_table(out, "clusters")
    assert whole["n_clusters"].to_dict() == clusters.groupby("scan_id").size().to_dict()
    assert tables.read_table(out, "evaluation").empty
    assert list(tables.read_table(out, "evaluation").columns) == tables.SCHEMAS["evaluation"].names


def test_pandas_and_duckdb_read_the_tables(out: Path) -> None:
    import duckdb

    with_pandas = pd.read_parquet(out / parts.TABLES / "regions")
    glob = str(out / parts.TABLES / "regions" / "*.parquet")
    query = f"SELECT sum(n_clusters) FROM read_parquet('{glob}') WHERE region = 'whole_brain'"
    [(total,)] = duckdb.connect().execute(query).fetchall()
    assert total == with_pandas.query("region == 'whole_brain'")["n_clusters"].sum() > 0


def test_open_results_gives_xarray_objects(out: Path) -> None:
    results = pingu_dask.open_results(out)
    assert results.run == {"tool": "pingu-dask", "n_scans": 3}
    dataset = results.regions
    assert dict(dataset.sizes) == {"scan_id": 3, "region": len(ASEG.names) + 2}
    assert dataset["site"].sel(scan_id="s3").item() == "B"
    table = tables.read_table(out, "regions").set_index(["scan_id", "region"])
    assert (
        dataset["total_volume_mm3"].sel(scan_id="s2", region="white_matter").item()
        == table.loc[("s2", "white_matter"), "total_volume_mm3"]
    )
    mask = results.mask("s2")
    assert mask.dims == ("x", "y", "z") and mask.shape == (48, 40, 20)
    assert mask["x"].values[:2].tolist() == pytest.approx([30.0, 29.2])  # flipped axis
    assert mask["z"].values[-1] == pytest.approx(-10.0 + 19 * 2.0)
    assert mask.attrs["oblique_degrees"] == 0.0
    stored, _ = masks.read_mask(out, "s2")
    assert int(mask.sum()) == int(stored.sum()) > 0
    assert results.scan_ids == ["s1", "s2", "s3"]
    with pytest.raises(FileNotFoundError, match="not a pingu-dask output directory"):
        pingu_dask.open_results(out / "nowhere")


def test_nifti_names_follow_bids_where_they_are_unique() -> None:
    scans = [
        make_scan("a", "X", "sub-01", "ses-1"),
        make_scan("b", "X", "02"),
        make_scan("c1", "X", "03", "1"),
        make_scan("c2", "X", "03", "1"),  # a second run of the same session
        make_scan("d", "X", "04_x"),  # not a BIDS label
        make_scan("e", "X"),
    ]
    assert layout.nifti_names(scans) == {
        "a": "sub-01/ses-1/anat/sub-01_ses-1_desc-pvs_mask.nii.gz",
        "b": "sub-02/anat/sub-02_desc-pvs_mask.nii.gz",
        "c1": "sub-03/ses-1/anat/c1_desc-pvs_mask.nii.gz",
        "c2": "sub-03/ses-1/anat/c2_desc-pvs_mask.nii.gz",
        "d": "d_desc-pvs_mask.nii.gz",
        "e": "e_desc-pvs_mask.nii.gz",
    }


def test_replace_table_leaves_one_copy(out: Path, tmp_path: Path) -> None:
    table = tables.read_table(out, "regions")
    import pyarrow as pa

    rows = pa.Table.from_pandas(table, schema=tables.SCHEMAS["regions"], preserve_index=False)
    tables.replace_table(tmp_path, "regions", rows)
    tables.replace_table(tmp_path, "regions", rows)
    assert len(tables.read_table(tmp_path, "regions")) == len(table)
    assert [p.name for p in (tmp_path / parts.TABLES).iterdir()] == ["regions"]
