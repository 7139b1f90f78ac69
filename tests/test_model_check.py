"""The model is checked before any scan is sent (issue 24, point 3).

Real parts: the bundled demo model's real checkpoint (copied into three folds, as a
5-fold model has several), real torch loading, real zips laid out as
nnUNetv2_export_model_to_zip writes them (deflated), and `pingu-dask run` through its
click command. A damaged model must stop the run before the Dask client starts: no
ledger row, no lock left, one message naming the file and saying "truncated or corrupt".
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import dask.config
import pytest
import torch
from click.testing import CliRunner
from helpers import absolute_manifest

from pingu_dask.errors import ModelError
from pingu_dask.nnunet.checkpoints import check_checkpoints, load_checkpoint
from pingu_dask.nnunet.convert_v1 import import_v1_model
from pingu_dask.nnunet.model import demo_model_folder, resolve_model
from pingu_dask.output import tables

CHECKPOINT = "checkpoint_final.pth"
FOLDS = ("0", "1", "2")


@pytest.fixture
def three_folds(tmp_path: Path) -> Path:
    """A copy of the demo model whose one fold (`all`) is copied into folds 0, 1, 2."""
    target = tmp_path / "models" / demo_model_folder().name
    shutil.copytree(demo_model_folder(), target)
    for fold in FOLDS:
        shutil.copytree(target / "fold_all", target / f"fold_{fold}")
    shutil.rmtree(target / "fold_all")
    return target


@pytest.fixture
def cache(tmp_path: Path):
    """A cache folder of this test's own for unpacked zips."""
    folder = tmp_path / "cache"
    with dask.config.set({"pingu.cache-dir": str(folder)}):
        yield folder


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_bytes(path: Path, at: float = 0.5, n: int = 64) -> None:
    """Invert `n` bytes in the middle of the file: the size stays, the content is wrong."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def export_zip(model_folder: Path, archive: Path) -> Path:
    """A zip laid out as nnUNetv2_export_model_to_zip writes one (deflated, paths from
    the results folder: DatasetXXX_Name/Trainer__Plans__configuration/...)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(model_folder.rglob("*")):
            handle.write(path, Path("Dataset901_PinguDemo") / path.relative_to(model_folder.parent))
    return archive


def run_cli(manifest: Path, out: Path, model: Path | str) -> tuple[int, str]:
    from pingu_dask.cli import main

    arguments = ["run", str(manifest), "--out", str(out), "--model", str(model)]
    result = CliRunner().invoke(main, [*arguments, "--no-tta", "--device", "cpu"])
    return result.exit_code, result.output


# --- the check itself ----------------------------------------------------------------


def test_a_good_model_passes_and_the_check_is_cheap(three_folds: Path) -> None:
    demo = resolve_model("demo")
    started = time.perf_counter()
    check_checkpoints(demo)
    seconds = time.perf_counter() - started
    print(f"check_checkpoints(demo model, folds {demo.folds}): {seconds * 1000:.1f} ms")
    model = resolve_model(three_folds)
    assert model.folds == FOLDS
    check_checkpoints(model)
    assert seconds < 5.0


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: truncate(p, 0.5),
        lambda p: truncate(p, 0.999),  # only the zip directory at the end is cut
        lambda p: p.write_bytes(b""),
        lambda p: flip_bytes(p, 0.5),  # torch loads this silently; the CRC does not match
        lambda p: p.write_bytes(b"not a torch file"),
    ],
    ids=["half", "last-bytes", "empty", "flipped-bytes", "not-torch"],
)
def test_a_damaged_fold_is_named_as_truncated_or_corrupt(three_folds: Path, damage) -> None:
    model = resolve_model(three_folds)
    broken = three_folds / "fold_1" / CHECKPOINT
    damage(broken)
    with pytest.raises(ModelError) as caught:
        check_checkpoints(model)
    message = str(caught.value)
    assert str(broken) in message and "truncated or corrupt" in message
    assert "\n" not in message  # one line for the CLI


def test_a_checkpoint_without_weights_is_refused_by_name(three_folds: Path) -> None:
    path = three_folds / "fold_2" / CHECKPOINT
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["network_weights"]
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match="no 'network_weights'") as caught:
        check_checkpoints(resolve_model(three_folds))
    assert str(path) in str(caught.value)
    checkpoint["network_weights"] = {}
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match="not a non-empty state dict"):
        check_checkpoints(resolve_model(three_folds))


def test_the_predictor_loader_keeps_io_errors_transient(tmp_path: Path) -> None:
    """On a worker an OSError (an NFS hiccup) is retried, so load_checkpoint passes it
    on; the driver's check turns it into a ModelError naming the file."""
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "gone.pth")
    folder = tmp_path / "m"
    shutil.copytree(demo_model_folder(), folder)
    model = resolve_model(folder)
    gone = folder / "fold_all" / CHECKPOINT
    gone.unlink()
    with pytest.raises(ModelError, match=f"cannot read the checkpoint {re.escape(str(gone))}"):
        check_checkpoints(model)


# --- zips ----------------------------------------------------------------------------


def test_a_whole_zip_resolves_and_passes(three_folds: Path, tmp_path: Path, cache: Path) -> None:
    model = resolve_model(export_zip(three_folds, tmp_path / "model.zip"))
    assert model.folder.is_relative_to(cache) and model.folds == FOLDS
    assert model.fingerprint == resolve_model(three_folds).fingerprint
    check_checkpoints(model)
    assert [p.name for p in (cache / "models").iterdir()] == [model.folder.parents[1].name]


@pytest.mark.parametrize(
    "damage",
    [lambda p: truncate(p, 0.5), lambda p: truncate(p, 0.99), lambda p: flip_bytes(p, 0.3)],
    ids=["half", "end-cut", "flipped-bytes"],
)
def test_a_truncated_or_corrupt_zip_says_so(
    three_folds: Path, tmp_path: Path, cache: Path, damage
) -> None:
    archive = export_zip(three_folds, tmp_path / "model.zip")
    damage(archive)
    with pytest.raises(ModelError) as caught:
        resolve_model(archive)
    message = str(caught.value)
    assert str(archive) in message and "truncated or corrupt" in message
    assert "nnUNetv2_export_model_to_zip" not in message
    left = list((cache / "models").iterdir()) if (cache / "models").exists() else []
    assert left == []  # no cache folder, and no staging folder either


def test_a_zip_that_is_not_a_model_keeps_its_message(tmp_path: Path, cache: Path) -> None:
    whole = tmp_path / "notes.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("notes/readme.txt", "not a model")
    with pytest.raises(ModelError, match=f"{whole} is not a zip made by nnUNetv2_export"):
        resolve_model(whole)
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="is a file but not a zip made by nnUNetv2_export"):
        resolve_model(text)


def test_a_truncated_v1_zip_says_so_too(three_folds: Path, tmp_path: Path, cache: Path) -> None:
    archive = export_zip(three_folds, tmp_path / "v1.zip")
    truncate(archive, 0.5)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        import_v1_model(archive, tmp_path / "imported")
    (tmp_path / "v1.txt").write_text("x")
    with pytest.raises(ModelError, match=r"is a file but not a zip$"):
        import_v1_model(tmp_path / "v1.txt", tmp_path / "imported")


def test_a_stale_staging_folder_is_not_taken_for_the_model(
    three_folds: Path, tmp_path: Path, cache: Path
) -> None:
    """What a killed unpacking leaves is a hidden .partial folder: never used, and the
    next unpacking writes a whole model beside it."""
    archive = export_zip(three_folds, tmp_path / "model.zip")
    first = resolve_model(archive)
    digest_folder = first.folder.parents[1]
    shutil.rmtree(digest_folder)
    stale = digest_folder.with_name(f".{digest_folder.name}.99999.partial")
    shutil.copytree(three_folds.parent, stale / "Dataset901_PinguDemo")
    truncate(stale / "Dataset901_PinguDemo" / three_folds.name / "fold_0" / CHECKPOINT)
    again = resolve_model(archive)
    assert again.folder == first.folder and again.fingerprint == first.fingerprint
    check_checkpoints(again)


# --- the run -------------------------------------------------------------------------


def assert_nothing_was_run(out: Path, output: str) -> None:
    """No scan attempted: no ledger rows, no masks, no Dask client, and no lock left."""
    ledger = out / "tables" / "ledger"
    assert not ledger.exists() or tables.read_table(out, "ledger").empty
    assert not (out / "masks.zarr").exists()
    assert not (out / ".lock").exists()
    assert "Dask dashboard" not in output


def test_run_with_a_truncated_checkpoint_stops_before_dispatch(
    three_folds: Path, tmp_path: Path, cohort: Path
) -> None:
    manifest = tmp_path / "two.csv"
    absolute_manifest(cohort, manifest, rows=2)
    broken = three_folds / "fold_1" / CHECKPOINT
    truncate(broken)
    out = tmp_path / "out"
    started = time.perf_counter()
    code, output = run_cli(manifest, out, three_folds)
    seconds = time.perf_counter() - started
    assert code == 1, output
    lines = [line for line in output.splitlines() if "truncated or corrupt" in line]
    assert len(lines) == 1 and str(broken) in lines[0], output
    assert_nothing_was_run(out, output)
    assert not (out / "run.json").exists()
    assert seconds < 60  # at once: no workers started, no scan tried


def test_run_with_a_truncated_zip_stops_at_once(
    three_folds: Path, tmp_path: Path, cohort: Path, cache: Path
) -> None:
    manifest = tmp_path / "two.csv"
    absolute_manifest(cohort, manifest, rows=2)
    archive = export_zip(three_folds, tmp_path / "model.zip")
    truncate(archive)
    out = tmp_path / "out"
    code, output = run_cli(manifest, out, archive)
    text = " ".join(output.split())
    assert code == 2, output  # resolving --model: a usage error, as a missing model is
    assert f"{archive}: truncated or corrupt zip" in text
    assert_nothing_was_run(out, output)


@pytest.mark.slow
def test_a_whole_zip_runs(three_folds: Path, tmp_path: Path, cohort: Path, cache: Path) -> None:
    """The check lets a good model through: one scan, all three folds, exit 0."""
    manifest = tmp_path / "one.csv"
    absolute_manifest(cohort, manifest, rows=1)
    archive = export_zip(three_folds, tmp_path / "model.zip")
    out = tmp_path / "out"
    code, output = run_cli(manifest, out, archive)
    assert code == 0, output
    ledger = tables.read_table(out, "ledger")
    assert ledger.status.tolist() == ["ok"]
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["folds"] == list(FOLDS)
    assert not (out / ".lock").exists()
