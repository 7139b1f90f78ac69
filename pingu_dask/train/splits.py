"""Cross-validation splits as the PINGU paper uses them, written as nnU-Net's splits_final.json.

- `kfold`: K folds stratified by site: each site's cases are shuffled (seeded) and dealt
  round-robin over the folds, so every site is in every fold's validation set (internal
  cross-validation; nnU-Net's own default split ignores sites);
- `site`: leave one site out: a fold per site, validated on the site it never saw (the
  paper's "unseen site" figures);
- `train-site:SITE`: one fold trained on SITE's cases only and validated on every other
  site (the paper's single-site model against external sites).

The same cases and seed give the same splits. Which of a site's cases are validated
together depends only on the site's sorted case ids and the seed; which fold number
each group gets also depends on the sites before it (folds are kept within one case of
each other in size), so adding a site may renumber them. Cases without a site form one
site of their own, named NO_SITE.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pingu_dask.errors import InputError

KINDS = ("kfold", "site", "train-site")
NO_SITE = "(no site)"


class SplitError(InputError):
    """Splits that cannot be made from these cases; the message says what to change."""


@dataclass(frozen=True)
class SplitSpec:
    """What the user asked for: `kfold` (with k), `site`, or `train-site` (with site)."""

    kind: str
    k: int = 5
    site: str | None = None
    seed: int = 12345

    @classmethod
    def parse(cls, text: str, k: int = 5, seed: int = 12345) -> SplitSpec:
        """'kfold', 'site' or 'train-site:SITE'."""
        kind, _, site = text.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise SplitError(f"unknown split {text!r}: use kfold, site or train-site:SITE")
        if kind == "train-site" and not site.strip():
            raise SplitError("train-site needs the site to train on: train-site:SITE")
        if kind != "train-site" and site:
            raise SplitError(f"split {kind!r} takes no site (got {text!r})")
        if kind == "kfold" and k < 2:
            raise SplitError(f"kfold needs at least 2 folds, got {k}")
        if seed < 0:
            raise SplitError(f"the seed must be 0 or more, got {seed}")
        return cls(kind, k, site.strip() or None, seed)

    def describe(self) -> str:
        if self.kind == "kfold":
            return f"{self.k}-fold cross-validation stratified by site (seed {self.seed})"
        if self.kind == "site":
            return "leave one site out: one fold per site, validated on that site"
        return f"trained on site {self.site}, validated on every other site"


@dataclass(frozen=True)
class Fold:
    """One fold: its training and validation cases and what it stands for."""

    index: int
    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]

    def as_nnunet(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val)}


def make_splits(cases: Sequence[tuple[str, str | None]], spec: SplitSpec) -> list[Fold]:
    """The folds for (case id, site) pairs; SplitError when they cannot be made."""
    by_site: dict[str, list[str]] = defaultdict(list)
    for case, site in cases:
        by_site[site or NO_SITE].append(case)
    for members in by_site.values():
        members.sort()
    if len({case for case, _ in cases}) != len(cases):
        raise SplitError("case ids must be unique")
    if spec.kind == "kfold":
        return _kfold(by_site, spec)
    if len(by_site) < 2:
        raise SplitError(
            f"split {spec.kind!r} needs cases from at least 2 sites; these come from "
            f"{len(by_site)} ({', '.join(sorted(by_site))}): give the manifest a `site` column, "
            "or use --split kfold"
        )
    if spec.kind == "site":
        return [
            Fold(index, f"{site} held out", _others(by_site, site), tuple(by_site[site]))
            for index, site in enumerate(sorted(by_site))
        ]
    if spec.site not in by_site:
        raise SplitError(
            f"train-site:{spec.site}: no training case has site {spec.site!r} "
            f"(sites: {', '.join(sorted(by_site))})"
        )
    site = str(spec.site)
    return [Fold(0, f"trained on {site}", tuple(by_site[site]), _others(by_site, site))]


def _others(by_site: dict[str, list[str]], site: str) -> tuple[str, ...]:
    return tuple(
        sorted(case for other, members in by_site.items() if other != site for case in members)
    )


def _kfold(by_site: dict[str, list[str]], spec: SplitSpec) -> list[Fold]:
    small = {site: len(members) for site, members in by_site.items() if len(members) < spec.k}
    if small:
        listing = ", ".join(f"{site} ({n})" for site, n in sorted(small.items()))
        raise SplitError(
            f"{spec.k}-fold cross-validation stratified by site needs at least {spec.k} cases "
            f"per site, so that every site is in every fold's validation; too few: {listing}. "
            "Use fewer --folds, or --split site"
        )
    validation: list[list[str]] = [[] for _ in range(spec.k)]
    for site in sorted(by_site):
        # One generator per site, seeded from the seed and the site's name: adding a
        # site does not reshuffle the others' groups (their fold numbers may rotate).
        seed = [spec.seed, *site.encode()]
        order = np.random.default_rng(seed).permutation(len(by_site[site]))
        offset = sum(len(v) for v in validation) % spec.k  # spread remainders over folds
        for position, index in enumerate(order):
            validation[(offset + position) % spec.k].append(by_site[site][index])
    every = sorted(case for members in by_site.values() for case in members)
    folds = []
    for index, val in enumerate(validation):
        held = set(val)
        folds.append(
            Fold(
                index, f"fold {index}", tuple(c for c in every if c not in held), tuple(sorted(val))
            )
        )
    return folds


def splits_final(folds: Sequence[Fold]) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json: a list of {"train": [...], "val": [...]} by fold."""
    return [fold.as_nnunet() for fold in folds]
