"""Cohort manifests: read a CSV / TSV / Parquet table, check every row, make Scan records.

A manifest has one row per scan: `scan_id`, one path column per model input channel
(default `t1w`), and optionally `subject`, `session`, `site`, `parcellation` and
`reference`. Relative paths are taken from the manifest's own folder, so a cohort folder
can be moved as a whole.

Validation reports every problem at once (a cohort of thousands should not be fixed one
error per run), each with its row number and a plain reason. Rows count from 1 after
the header, so row N of a CSV file is on line N + 1. Only rows without problems become
Scan records. Scan ids end up in file and Zarr names, so they are held to a strict
alphabet: this is what keeps a manifest from writing outside the output folder.

An optional column lost to a typo loses its data silently (a `parcelation` column gives
whole-brain figures only, a `refrence` column no evaluation), so an unknown column that
looks like a known column the manifest lacks is a problem ("did you mean ...?") unless
unknown columns are allowed; other unknown columns are noted and ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pingu_dask.errors import InputError
from pingu_dask.inputs.bids import SUFFIXES as KNOWN_CHANNELS
from pingu_dask.inputs.imaging import LABEL_MAP_SUFFIXES, ImageError, ImageInfo, read_info

DEFAULT_CHANNELS = ("t1w",)
OPTIONAL_TEXT_COLUMNS = ("subject", "session", "site")
OPTIONAL_PATH_COLUMNS = ("parcellation", "reference")
MAX_ID_LENGTH = 128
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
# difflib ratio from which an unknown column counts as a misspelling of a known one:
# catches parcelation, refrence, sesion, t1, subject_id, reference_mask; leaves visit
# (0.67 against site), scanner, sex, notes alone.
CLOSE_COLUMN_CUTOFF = 0.75
NO_REGION_SOURCE = "none"


@dataclass(frozen=True, slots=True)
class Scan:
    """One validated manifest row: an id that is safe as a file name and absolute paths."""

    scan_id: str
    channels: tuple[tuple[str, Path], ...]  # (channel name, image path) in model input order
    subject: str | None = None
    session: str | None = None
    site: str | None = None
    parcellation: Path | None = None
    reference: Path | None = None
    row: int = 0

    @property
    def channel_paths(self) -> tuple[Path, ...]:
        return tuple(path for _, path in self.channels)

    def channel(self, name: str) -> Path:
        """The image path of one input channel, e.g. scan.channel('t1w')."""
        for channel_name, path in self.channels:
            if channel_name == name:
                return path
        raise KeyError(f"scan {self.scan_id!r} has no channel {name!r}")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest; `row` is None when it concerns the whole table."""

    message: str
    row: int | None = None
    scan_id: str = ""
    column: str = ""

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.scan_id:
            where.append(f"scan {self.scan_id!r}")
        if self.column:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass(frozen=True)
class ManifestReport:
    """The outcome of reading a manifest: the good scans and every problem found."""

    path: Path
    n_rows: int
    channels: tuple[str, ...]
    scans: tuple[Scan, ...]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def table_problems(self) -> tuple[Problem, ...]:
        """Problems of the whole table (its columns), which skipping bad rows cannot fix."""
        return tuple(problem for problem in self.problems if problem.row is None)


class ManifestError(InputError):
    """Raised by `require_valid` when a manifest has problems; carries the full report."""

    def __init__(self, report: ManifestReport) -> None:
        self.report = report
        lines = [f"{report.path}: {len(report.problems)} problem(s)"]
        lines += [f"  {problem}" for problem in report.problems[:20]]
        if len(report.problems) > 20:
            lines.append(f"  ... and {len(report.problems) - 20} more")
        super().__init__("\n".join(lines))


def unsafe_id_reason(scan_id: str) -> str | None:
    """Why `scan_id` cannot be used as a file or Zarr group name, or None when it can."""
    if not scan_id:
        return "empty scan_id"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in scan_id):
        return f"unsafe scan_id {scan_id!r}: contains control characters"
    if ".." in scan_id:
        return f"unsafe scan_id {scan_id!r}: contains '..'"
    if "/" in scan_id or "\\" in scan_id:
        return f"unsafe scan_id {scan_id!r}: contains a path separator"
    if scan_id.startswith("."):
        return f"unsafe scan_id {scan_id!r}: starts with a dot (hidden file name)"
    if len(scan_id) > MAX_ID_LENGTH:
        return f"unsafe scan_id: longer than {MAX_ID_LENGTH} characters"
    if not SAFE_ID.fullmatch(scan_id):
        return (
            f"unsafe scan_id {scan_id!r}: use only letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return None


def read_manifest_file(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest table as strings (empty cells become ''), column names lower-cased."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if suffix in TEXT_SUFFIXES:
        table = pd.read_csv(
            path,
            sep=TEXT_SUFFIXES[suffix],
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skipinitialspace=False,
        )
    elif suffix in PARQUET_SUFFIXES:
        table = pd.read_parquet(path)
        table = table.astype(object).where(table.notna(), "").astype(str)
    else:
        raise ValueError(f"unsupported manifest format {path.name!r}: use .csv, .tsv or .parquet")
    table.columns = [str(column).strip().lower() for column in table.columns]
    return table


def load_manifest(
    path: str | os.PathLike[str],
    channels: Sequence[str] = DEFAULT_CHANNELS,
    check_files: bool = True,
    jobs: int = 8,
    allow_unknown_columns: bool = False,
) -> ManifestReport:
    """Read and validate a manifest.

    `channels` are the model's input channels, in order; each must be a column.
    With `check_files`, every referenced file is opened (header only, `jobs` at a time,
    which matters on network file systems): it must exist, be a readable NIfTI and be
    3D, and a scan's channels must share one grid. An unknown column close to a known
    column the table lacks (`parcelation`) is a problem, or with
    `allow_unknown_columns` a note; see unknown_columns.
    """
    path = Path(path).absolute()
    channels = tuple(c.strip().lower() for c in channels)
    table = read_manifest_file(path)
    base = path.parent
    columns = list(table.columns)
    problems: list[Problem] = []
    notes: list[str] = []

    duplicated_columns = sorted({c for c in columns if columns.count(c) > 1})
    for column in duplicated_columns:
        problems.append(Problem(f"column {column!r} appears more than once"))
    required = ("scan_id", *channels)
    missing = [c for c in required if c not in columns]
    for column in missing:
        problems.append(
            Problem(
                f"missing required column {column!r} (columns found: "
                f"{', '.join(columns) or 'none'})"
            )
        )
    known = (*required, *OPTIONAL_TEXT_COLUMNS, *OPTIONAL_PATH_COLUMNS)
    misspelt, ignored = unknown_columns(columns, known)
    for column, meant in misspelt.items():
        if allow_unknown_columns:
            notes.append(
                f"column {column!r} ignored (unknown columns allowed): it looks like "
                f"{meant!r}, which this manifest does not have"
            )
        else:
            problems.append(
                Problem(
                    f"unknown column {column!r}: did you mean {meant!r}? As spelled it is "
                    "ignored; rename it, or allow unknown columns (--allow-unknown-columns) "
                    "to go on without it"
                )
            )
    if ignored:
        notes.append(f"columns ignored: {', '.join(ignored)}")
    if missing or duplicated_columns:
        return ManifestReport(path, len(table), channels, (), tuple(problems), tuple(notes))

    def column_values(name: str) -> Iterable[str]:
        return table[name].tolist() if name in table.columns else [""] * len(table)

    first_row_of: dict[str, int] = {}
    candidates: list[tuple[int, dict[str, str]]] = []
    rows = zip(
        column_values("scan_id"),
        *(column_values(c) for c in channels),
        *(column_values(c) for c in OPTIONAL_TEXT_COLUMNS),
        *(column_values(c) for c in OPTIONAL_PATH_COLUMNS),
        strict=True,
    )
    names = ("scan_id", *channels, *OPTIONAL_TEXT_COLUMNS, *OPTIONAL_PATH_COLUMNS)
    for row_number, values in enumerate(rows, start=1):
        record = dict(zip(names, values, strict=True))
        scan_id = record["scan_id"]
        row_problems = []
        reason = unsafe_id_reason(scan_id)
        if reason:
            row_problems.append(Problem(reason, row_number, scan_id, "scan_id"))
        elif scan_id in first_row_of:
            row_problems.append(
                Problem(
                    f"duplicate scan_id (first used in row {first_row_of[scan_id]})",
                    row_number,
                    scan_id,
                    "scan_id",
                )
            )
        else:
            first_row_of[scan_id] = row_number
        for channel in channels:
            if not record[channel].strip():
                row_problems.append(
                    Problem(f"no image path for channel {channel!r}", row_number, scan_id, channel)
                )
        problems.extend(row_problems)
        if not row_problems:
            candidates.append((row_number, record))

    scans = [_make_scan(row_number, record, channels, base) for row_number, record in candidates]
    if check_files:
        scans, file_problems = _check_files(scans, jobs)
        problems.extend(file_problems)
        problems.sort(key=lambda p: p.row or 0)
    return ManifestReport(path, len(table), channels, tuple(scans), tuple(problems), tuple(notes))


def unknown_columns(
    columns: Sequence[str], known: Sequence[str]
) -> tuple[dict[str, str], list[str]]:
    """The columns not in `known`: ({misspelt column: the known column it looks like},
    [other unknown columns]).

    A column counts as misspelt when difflib finds it close (CLOSE_COLUMN_CUTOFF) to a
    known column that the table does not have: then its data would be lost. Close to a
    column that is there (`site_id` beside `site`), or named like another model's input
    channel (`t2w` for a T1w-only model), it is a deliberate extra and only ignored.
    """
    absent = [c for c in dict.fromkeys(known) if c not in columns]
    misspelt: dict[str, str] = {}
    ignored: list[str] = []
    for column in dict.fromkeys(columns):
        if column in known:
            continue
        close = [] if column in KNOWN_CHANNELS else _close(column, absent)
        if close:
            misspelt[column] = close[0]
        else:
            ignored.append(column)
    return misspelt, ignored


def _close(column: str, candidates: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(column, candidates, n=1, cutoff=CLOSE_COLUMN_CUTOFF)


def region_source(scan: Scan, table_name: str) -> str:
    """Where a scan's regions come from: the region table its parcellation is read with
    (e.g. "synthseg", or a JSON table's name), or "none" (whole-brain figures only)."""
    return table_name if scan.parcellation is not None else NO_REGION_SOURCE


def whole_brain_only_note(
    n_without: int, brain_rule_share: float | None = None, n_whole_brain: int | None = None
) -> str:
    """The sentence run, validate, status and the report say about scans without a
    parcellation (one wording, so that it can be searched for); with `brain_rule_share`
    (the brain rule is on), also that the rule did not run for them. `n_whole_brain`:
    how many of them got whole-brain figures only (the others had regions from the
    model's own labels); None: all of them."""
    scans = "scan" if n_without == 1 else "scans"
    note = f"{n_without} {scans} without a parcellation: "
    if n_whole_brain is None or n_whole_brain == n_without:
        note += "whole-brain figures only"
    else:
        note += (
            f"{n_without - n_whole_brain} with regions from the model's labels, "
            f"{n_whole_brain} with whole-brain figures only"
        )
    if brain_rule_share is not None:
        note += f", and no brain rule (max-outside-brain {brain_rule_share:g} needs a parcellation)"
    return note


def region_sources_note(record: Mapping | None) -> str | None:
    """whole_brain_only_note from run.json's `region_sources` record (run/provenance.py),
    or None when every scan had a parcellation (or the atlas) or the run predates the
    record."""
    if not record or not record.get("scans_without_parcellation"):
        return None
    rule = record.get("brain_rule") or {}
    share = rule.get("max_outside_brain") if rule.get("on") else None
    whole = record.get("scans_whole_brain_only")
    return whole_brain_only_note(
        int(record["scans_without_parcellation"]), share, None if whole is None else int(whole)
    )


def require_valid(report: ManifestReport) -> tuple[Scan, ...]:
    """The scans of a manifest with no problems; raise ManifestError otherwise."""
    if not report.ok:
        raise ManifestError(report)
    return report.scans


def _resolve(base: Path, value: str) -> Path | None:
    value = value.strip()
    if not value:
        return None
    return Path(os.path.normpath(os.path.join(base, os.path.expanduser(value))))


def _required(base: Path, value: str) -> Path:
    """A path the manifest must give (validated as present before scans are made)."""
    path = _resolve(base, value)
    if path is None:
        raise ValueError(f"empty path: {value!r}")
    return path


def _make_scan(row: int, record: dict[str, str], channels: tuple[str, ...], base: Path) -> Scan:
    def text(name: str) -> str | None:
        return record[name].strip() or None

    return Scan(
        scan_id=record["scan_id"],
        channels=tuple((c, _required(base, record[c])) for c in channels),
        subject=text("subject"),
        session=text("session"),
        site=text("site"),
        parcellation=_resolve(base, record["parcellation"]),
        reference=_resolve(base, record["reference"]),
        row=row,
    )


def _check_files(scans: list[Scan], jobs: int) -> tuple[list[Scan], list[Problem]]:
    """Open every referenced file's header once (in parallel) and check each scan's files."""
    paths = sorted({p for scan in scans for p in _file_columns(scan).values()})
    channel_paths = {p for scan in scans for p in scan.channel_paths}

    def inspect(path: Path) -> ImageInfo | str:
        try:
            return read_info(path) if path in channel_paths else read_info(path, LABEL_MAP_SUFFIXES)
        except ImageError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        infos = dict(zip(paths, pool.map(inspect, paths), strict=True))

    read = {path: info for path, info in infos.items() if isinstance(info, ImageInfo)}
    good: list[Scan] = []
    problems: list[Problem] = []
    for scan in scans:
        found = []
        for column, path in _file_columns(scan).items():
            info = infos[path]
            if isinstance(info, str):
                found.append(Problem(info, scan.row, scan.scan_id, column))
            elif not info.is_3d:
                found.append(
                    Problem(
                        f"not a 3D image (shape {info.shape}): {path}",
                        scan.row,
                        scan.scan_id,
                        column,
                    )
                )
        if not found:
            mismatch = channel_grid_mismatch(scan, read)
            if mismatch:
                found.append(Problem(mismatch, scan.row, scan.scan_id, scan.channels[0][0]))
        problems.extend(found)
        if not found:
            good.append(scan)
    return good, problems


def _file_columns(scan: Scan) -> dict[str, Path]:
    files = dict(scan.channels)
    if scan.parcellation:
        files["parcellation"] = scan.parcellation
    if scan.reference:
        files["reference"] = scan.reference
    return files


def channel_grid_mismatch(scan: Scan, infos: Mapping[Path, ImageInfo]) -> str | None:
    """A reason when a scan's input channels are not on one voxel grid (nnU-Net needs that)."""
    if not scan.channels:  # e.g. evaluation, which reads no input image
        return None
    (first_name, first_path), *others = scan.channels
    first = infos[first_path]
    for name, path in others:
        other = infos[path]
        if other.shape[:3] != first.shape[:3]:
            return (
                f"channels have different shapes: {first_name} {first.shape[:3]} vs "
                f"{name} {other.shape[:3]}"
            )
        if not np.allclose(other.affine, first.affine, atol=1e-3):
            return f"channels {first_name} and {name} have different affines (not co-registered?)"
    return None


def scan_columns(scan: Scan) -> dict[str, str | None]:
    """The identifying columns every per-scan table row starts with."""
    return {
        "scan_id": scan.scan_id,
        "subject": scan.subject,
        "session": scan.session,
        "site": scan.site,
    }


def input_fingerprint(scan: Scan) -> str:
    """Path, size and modification time of every input file: changes when one is replaced."""
    paths = [*scan.channel_paths, scan.parcellation, scan.reference]
    parts = []
    for path in paths:
        if path is not None:
            stat = Path(path).stat()
            parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
