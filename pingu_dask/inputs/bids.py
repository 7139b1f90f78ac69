"""A BIDS dataset as a manifest: one scan per T1w image, with the other channels the
model asks for and a SynthSeg/FreeSurfer parcellation from the derivatives.

A careful glob of the BIDS naming rules rather than pybids (which indexes every file
of a dataset into a database first: slow on 100,000 sessions on a network file
system): images are `sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]`
in `sub-<label>/[ses-<label>/]anat/`.

- Each T1w image is a scan, named by its entities (`sub-01_ses-2_run-1`), so several
  sessions and runs of a subject are separate scans.
- Another channel (T2w, FLAIR) is the image of that suffix in the same folder with the
  same entities; failing that, the only one there; otherwise the scan is reported.
- The parcellation is looked for under `derivatives/`: a `_dseg` image of the same
  subject and session whose name or pipeline folder says SynthSeg, then an aseg `_dseg`,
  then FreeSurfer's `derivatives/freesurfer/sub-<label>[_ses-<label>]/mri/aseg.mgz`.
- `participants.tsv` gives the site (column `site`, else `scanner`/`centre`/`center`).
- A subject or session without a T1w, or a scan without a channel, is reported and left
  out; the rest still run.
- A scan without a parcellation is kept (whole-brain figures only) and counted
  (`Discovery.without_parcellation`), so that it is said rather than found later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pingu_dask.errors import InputError

#: model channel name -> BIDS suffix
SUFFIXES = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "pd": "PD", "t2starw": "T2starw"}
ENTITY = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")
SITE_COLUMNS = ("site", "scanner", "centre", "center")


class BidsError(InputError):
    """The folder is not a BIDS dataset this tool can read."""


@dataclass(frozen=True)
class BidsImage:
    path: Path
    entities: tuple[tuple[str, str], ...]  # in file-name order, sub first
    suffix: str

    @property
    def name(self) -> str:
        """The entities as a scan id, e.g. sub-01_ses-2_run-1."""
        return "_".join(f"{key}-{value}" for key, value in self.entities)

    def get(self, key: str) -> str | None:
        return dict(self.entities).get(key)


@dataclass
class Discovery:
    """What was found: manifest rows and, one line each, what could not be used."""

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def without_parcellation(self) -> int:
        """Scans found without a parcellation (no SynthSeg/aseg `_dseg`, no aseg.mgz):
        they get whole-brain figures only, which a cohort should hear about."""
        return sum(not row.get("parcellation") for row in self.rows)

    def manifest(self, channels: tuple[str, ...]) -> pd.DataFrame:
        columns = ["scan_id", "subject", "session", "site", *channels, "parcellation"]
        return pd.DataFrame(self.rows, columns=columns)


def parse_name(path: Path) -> BidsImage | None:
    """A BIDS image file name -> its entities and suffix; None if it is not one."""
    name = path.name
    for extension in (".nii.gz", ".nii", ".mgz"):
        if name.endswith(extension):
            name = name[: -len(extension)]
            break
    else:
        return None
    *parts, suffix = name.split("_")
    entities = []
    for part in parts:
        match = ENTITY.fullmatch(part)
        if match is None:
            return None
        entities.append((match.group(1), match.group(2)))
    if not entities or entities[0][0] != "sub" or not suffix:
        return None
    return BidsImage(path, tuple(entities), suffix)


def discover(root: Path, channels: tuple[str, ...] = ("t1w",)) -> Discovery:
    """Manifest rows for every T1w image of the BIDS dataset at `root`."""
    root = Path(root).absolute()
    if not (root / "dataset_description.json").is_file():
        raise BidsError(f"{root} is not a BIDS dataset (no dataset_description.json)")
    unknown = [c for c in channels if c not in SUFFIXES]
    if unknown:
        raise BidsError(
            f"no BIDS suffix known for channel(s) {', '.join(unknown)} "
            f"(known: {', '.join(SUFFIXES)}); write a manifest instead"
        )
    sites = _sites(root)
    parcellations = _parcellations(root)
    found = Discovery()
    for folder in _anat_folders(root, found):
        images = [i for i in map(parse_name, sorted(folder.glob("sub-*"))) if i is not None]
        t1w_images = [i for i in images if i.suffix == "T1w"]
        where = folder.parent.relative_to(root).as_posix()
        if not t1w_images:
            found.problems.append(f"{where}: no T1w image in {where}/anat")
            continue
        for t1w in t1w_images:
            row, problem = _row(t1w, images, channels, sites, parcellations)
            if problem:
                found.problems.append(f"{t1w.name}: {problem}")
            else:
                found.rows.append(row)
    found.problems.sort()
    return found


def _anat_folders(root: Path, found: Discovery) -> list[Path]:
    """Every sub-*/anat and sub-*/ses-*/anat folder; subjects without one are reported."""
    folders = []
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in subject.glob("ses-*") if p.is_dir()) or [subject]
        for session in sessions:
            anat = session / "anat"
            if anat.is_dir():
                folders.append(anat)
            else:
                where = session.relative_to(root).as_posix()
                found.problems.append(f"{where}: no T1w image (no anat folder)")
    return folders


def _row(t1w: BidsImage, images, channels, sites, parcellations) -> tuple[dict, str | None]:
    row = {
        "scan_id": t1w.name,
        "subject": t1w.get("sub"),
        "session": t1w.get("ses"),
        "site": sites.get(t1w.get("sub")),
    }
    for channel in channels:
        if channel == "t1w":
            row["t1w"] = str(t1w.path)
            continue
        suffix = SUFFIXES[channel]
        candidates = [i for i in images if i.suffix == suffix]
        same = [i for i in candidates if i.entities == t1w.entities]
        chosen = same or (candidates if len(candidates) == 1 else [])
        if not chosen:
            what = "no" if not candidates else f"{len(candidates)} candidate"
            return row, f"{what} {suffix} image for channel {channel!r} in the same folder"
        row[channel] = str(chosen[0].path)
    key = (t1w.get("sub"), t1w.get("ses"))
    options = parcellations.get(key, [])
    matching = [p for _, p, image in options if image is None or _same_scan(image, t1w)]
    row["parcellation"] = str(matching[0]) if matching else ""
    return row, None


def _same_scan(derived: BidsImage, t1w: BidsImage) -> bool:
    """A derivative belongs to a T1w if the entities they both have agree."""
    mine = dict(t1w.entities)
    return all(mine.get(key, value) == value for key, value in derived.entities if key != "desc")


def _parcellations(root: Path) -> dict[tuple, list]:
    """(subject, session) -> [(rank, path, parsed name or None)], best first."""
    found: dict[tuple, list] = {}
    derivatives = root / "derivatives"
    if not derivatives.is_dir():
        return found
    for path in derivatives.glob("*/sub-*/**/anat/*_dseg.*"):
        image = parse_name(path)
        if image is None:
            continue
        pipeline = path.relative_to(derivatives).parts[0].lower()
        description = (image.get("desc") or "").lower()
        if "synthseg" in pipeline or "synthseg" in description:
            rank = 0
        elif "aseg" in description or "aseg" in pipeline or "freesurfer" in pipeline:
            rank = 1
        else:
            continue
        key = (image.get("sub"), image.get("ses"))
        found.setdefault(key, []).append((rank, path, image))
    for path in derivatives.glob("freesurfer*/sub-*/mri/aseg.mgz"):
        match = re.fullmatch(r"sub-([a-zA-Z0-9]+)(?:_ses-([a-zA-Z0-9]+))?", path.parent.parent.name)
        if match:
            found.setdefault((match.group(1), match.group(2)), []).append((2, path, None))
    for options in found.values():
        options.sort(key=lambda option: (option[0], str(option[1])))
    return found


def _sites(root: Path) -> dict[str, str]:
    """participant label -> site, from participants.tsv when it has a site column."""
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path, sep="\t", dtype=str)
    column = next((c for c in SITE_COLUMNS if c in table.columns), None)
    if column is None or "participant_id" not in table.columns:
        return {}
    return {
        str(p).removeprefix("sub-"): s
        for p, s in zip(table["participant_id"], table[column], strict=True)
        if isinstance(s, str) and s
    }
