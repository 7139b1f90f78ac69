"""Cross-validation splits of `pingu-dask train` (train/splits.py), on made-up case lists.

Fast tier: no files, no Dask. What is checked: the split texts the CLI takes, kfold
stratified by site (every site in every fold's validation, each case validated once,
balanced folds, seeded and reproducible, stable when a cohort grows), leave one site
out, one site's model against the others, cases without a site, and the format nnU-Net
reads from splits_final.json.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pingu_dask.errors import InputError
from pingu_dask.train.splits import NO_SITE, Fold, SplitError, SplitSpec, make_splits, splits_final


def cohort(sizes: dict[str | None, int], prefix: str = "") -> list[tuple[str, str | None]]:
    """(case id, site) pairs: `n` cases per site, ids unique across sites."""
    cases = []
    for site, n in sizes.items():
        tag = site or "nosite"
        cases += [(f"{prefix}{tag}-{i:03d}", site) for i in range(n)]
    return cases


def site_map(cases: list[tuple[str, str | None]]) -> dict[str, str]:
    return {case: site or NO_SITE for case, site in cases}


def fold_of(folds: list[Fold]) -> dict[str, int]:
    """The fold whose validation set holds each case."""
    return {case: fold.index for fold in folds for case in fold.val}


# --- SplitSpec.parse ------------------------------------------------------------------


def test_parse_reads_the_three_kinds() -> None:
    assert SplitSpec.parse("kfold") == SplitSpec("kfold", 5, None, 12345)
    assert SplitSpec.parse(" KFold ", k=3, seed=7) == SplitSpec("kfold", 3, None, 7)
    assert SplitSpec.parse("site") == SplitSpec("site", 5, None, 12345)
    spec = SplitSpec.parse("train-site: hospital-A ")
    assert (spec.kind, spec.site) == ("train-site", "hospital-A")  # the site is stripped
    assert SplitSpec.parse("Train-Site:MixedCase").site == "MixedCase"  # the site keeps its case


@pytest.mark.parametrize(
    ("text", "k", "words"),
    [
        ("loso", 5, ["unknown split", "'loso'", "kfold, site or train-site:SITE"]),
        ("", 5, ["unknown split", "kfold, site or train-site:SITE"]),
        ("train-site", 5, ["needs the site", "train-site:SITE"]),
        ("train-site:  ", 5, ["needs the site"]),
        ("site:A", 5, ["'site' takes no site", "'site:A'"]),
        ("kfold:A", 5, ["'kfold' takes no site"]),
        ("kfold", 1, ["at least 2 folds", "got 1"]),
        ("kfold", 0, ["at least 2 folds", "got 0"]),
    ],
)
def test_parse_refuses_bad_texts_with_what_to_write(text: str, k: int, words: list[str]) -> None:
    with pytest.raises(SplitError) as raised:
        SplitSpec.parse(text, k=k)
    for word in words:
        assert word in str(raised.value)
    assert isinstance(raised.value, InputError)  # the CLI reports it as the user's input


def test_a_negative_seed_is_refused_as_a_split_error() -> None:
    with pytest.raises(SplitError, match="seed"):
        make_splits(cohort({"A": 4}), SplitSpec.parse("kfold", k=2, seed=-1))


def test_describe_says_what_the_figures_stand_for() -> None:
    assert SplitSpec.parse("kfold", k=4, seed=9).describe() == (
        "4-fold cross-validation stratified by site (seed 9)"
    )
    assert "leave one site out" in SplitSpec.parse("site").describe()
    assert SplitSpec.parse("train-site:B").describe() == (
        "trained on site B, validated on every other site"
    )


# --- kfold ----------------------------------------------------------------------------


SIZES = {"A": 11, "B": 7, "C": 5, "D": 20}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_is_stratified_by_site_and_covers_every_case_once(k: int) -> None:
    cases = cohort(SIZES)
    sites = site_map(cases)
    folds = make_splits(cases, SplitSpec.parse("kfold", k=k))
    assert [f.index for f in folds] == list(range(k))
    assert [f.name for f in folds] == [f"fold {i}" for i in range(k)]
    every = sorted(sites)
    validated = Counter(case for fold in folds for case in fold.val)
    assert sorted(validated) == every and set(validated.values()) == {1}  # each case once
    for fold in folds:
        assert set(fold.train).isdisjoint(fold.val)
        assert sorted([*fold.train, *fold.val]) == every  # train = all minus val
        assert list(fold.train) == sorted(fold.train) and list(fold.val) == sorted(fold.val)
        per_site = Counter(sites[case] for case in fold.val)
        assert set(per_site) == set(SIZES)  # every site in every fold's validation
        for site, n in SIZES.items():  # each site dealt evenly: n // k or n // k + 1
            assert per_site[site] in (n // k, -(-n // k)), (site, per_site)
    sizes = [len(fold.val) for fold in folds]
    assert max(sizes) - min(sizes) <= 1  # remainders spread over the folds


def test_kfold_with_k_equal_to_the_smallest_site_puts_one_of_its_cases_in_each_fold() -> None:
    cases = cohort({"A": 3, "B": 9})
    folds = make_splits(cases, SplitSpec.parse("kfold", k=3))
    for fold in folds:
        assert sum(case.startswith("A-") for case in fold.val) == 1
        assert sum(case.startswith("B-") for case in fold.val) == 3


def test_kfold_is_seeded_same_seed_same_folds_other_seed_other_folds() -> None:
    cases = cohort({"A": 30, "B": 30})
    first = make_splits(cases, SplitSpec.parse("kfold", k=5, seed=1))
    again = make_splits(list(reversed(cases)), SplitSpec.parse("kfold", k=5, seed=1))
    assert first == again  # the input order does not matter, only the cases and the seed
    other = make_splits(cases, SplitSpec.parse("kfold", k=5, seed=2))
    assert fold_of(other) != fold_of(first)
    # ...and not merely renumbered: the groups of cases validated together differ.
    assert {f.val for f in other} != {f.val for f in first}


def test_kfold_shuffles_within_a_site() -> None:
    """Not dealt in id order (sub-000 -> fold 0, sub-001 -> fold 1, ...): seeded shuffle."""
    cases = cohort({"A": 40})
    folds = make_splits(cases, SplitSpec.parse("kfold", k=4))
    dealt_in_order = [tuple(f"A-{i:03d}" for i in range(j, 40, 4)) for j in range(4)]
    assert sorted(f.val for f in folds) != sorted(dealt_in_order)


def test_adding_a_site_that_sorts_after_keeps_every_fold_of_the_others() -> None:
    before = cohort({"A": 7, "B": 8})
    after = before + cohort({"Z": 6})
    spec = SplitSpec.parse("kfold", k=3)
    old, new = fold_of(make_splits(before, spec)), fold_of(make_splits(after, spec))
    assert {case: new[case] for case in old} == old


def test_adding_a_site_keeps_which_cases_of_a_site_are_validated_together() -> None:
    """What the module promises: a site's cases are cut into the same groups whatever
    other sites there are (one generator per site); only the fold numbers of those
    groups may rotate, to keep folds balanced."""
    spec = SplitSpec.parse("kfold", k=3)
    before = cohort({"B": 8, "C": 7})
    after = cohort({"A": 4}) + before
    for site in ("B", "C"):
        groups_before = {
            frozenset(c for c in f.val if c.startswith(site)) for f in make_splits(before, spec)
        }
        groups_after = {
            frozenset(c for c in f.val if c.startswith(site)) for f in make_splits(after, spec)
        }
        assert groups_before == groups_after


def test_kfold_refuses_sites_with_fewer_cases_than_folds_and_names_them() -> None:
    cases = cohort({"big": 10, "small": 2, "tiny": 1})
    with pytest.raises(SplitError) as raised:
        make_splits(cases, SplitSpec.parse("kfold", k=3))
    message = str(raised.value)
    assert "small (2)" in message and "tiny (1)" in message
    assert "big" not in message
    assert "at least 3 cases per site" in message and "--folds" in message
    assert make_splits(cases[:10] + cases[10:12], SplitSpec.parse("kfold", k=2))  # k=2 fits


def test_kfold_groups_cases_without_a_site_as_one_site() -> None:
    cases = cohort({"A": 4, None: 6})
    sites = site_map(cases)
    folds = make_splits(cases, SplitSpec.parse("kfold", k=2))
    for fold in folds:
        assert Counter(sites[c] for c in fold.val) == {"A": 2, NO_SITE: 3}
    with pytest.raises(SplitError, match=r"\(no site\) \(2\)"):
        make_splits(cohort({"A": 5, None: 2}), SplitSpec.parse("kfold", k=3))


def test_kfold_needs_no_site_at_all() -> None:
    cases = cohort({None: 10})
    folds = make_splits(cases, SplitSpec.parse("kfold", k=5))
    assert [len(f.val) for f in folds] == [2] * 5
    assert sorted(c for f in folds for c in f.val) == sorted(c for c, _ in cases)


def test_case_ids_must_be_unique() -> None:
    with pytest.raises(SplitError, match="unique"):
        make_splits([("x", "A"), ("x", "B"), ("y", "A"), ("z", "B")], SplitSpec.parse("site"))


# --- site and train-site --------------------------------------------------------------


def test_site_split_holds_out_one_site_per_fold() -> None:
    cases = cohort({"B": 3, "A": 4, None: 2, "C": 5})
    sites = site_map(cases)
    folds = make_splits(cases, SplitSpec.parse("site"))
    names = sorted(["A", "B", "C", NO_SITE])
    assert [f.index for f in folds] == [0, 1, 2, 3]
    assert [f.name for f in folds] == [f"{site} held out" for site in names]
    for fold, site in zip(folds, names, strict=True):
        assert {sites[c] for c in fold.val} == {site}  # validated on that site only
        assert sorted(fold.val) == sorted(c for c in sites if sites[c] == site)  # all of it
        assert site not in {sites[c] for c in fold.train}  # never trained on it
        assert sorted([*fold.train, *fold.val]) == sorted(sites)
        assert list(fold.train) == sorted(fold.train)


@pytest.mark.parametrize("kind", ["site", "train-site:A"])
def test_site_splits_need_two_sites(kind: str) -> None:
    with pytest.raises(SplitError) as raised:
        make_splits(cohort({"A": 6}), SplitSpec.parse(kind))
    assert "at least 2 sites" in str(raised.value) and "from 1 (A)" in str(raised.value)
    assert "--split kfold" in str(raised.value)


def test_train_site_trains_on_one_site_and_validates_on_the_others() -> None:
    cases = cohort({"A": 3, "B": 4, None: 2})
    sites = site_map(cases)
    folds = make_splits(cases, SplitSpec.parse("train-site:B"))
    assert len(folds) == 1
    fold = folds[0]
    assert (fold.index, fold.name) == (0, "trained on B")
    assert sorted(fold.train) == sorted(c for c in sites if sites[c] == "B")
    assert sorted(fold.val) == sorted(c for c in sites if sites[c] != "B")
    assert {sites[c] for c in fold.val} == {"A", NO_SITE}


def test_train_site_on_an_unknown_site_lists_the_sites() -> None:
    with pytest.raises(SplitError) as raised:
        make_splits(cohort({"A": 3, "B": 4}), SplitSpec.parse("train-site:b"))
    message = str(raised.value)
    assert "train-site:b" in message and "'b'" in message
    assert "(sites: A, B)" in message


# --- nnU-Net's format -----------------------------------------------------------------


def test_splits_final_is_nnunets_list_of_train_and_val() -> None:
    cases = cohort({"A": 4, "B": 4})
    folds = make_splits(cases, SplitSpec.parse("kfold", k=2))
    document = splits_final(folds)
    assert isinstance(document, list) and len(document) == 2
    for entry, fold in zip(document, folds, strict=True):
        assert list(entry) == ["train", "val"]
        assert entry == {"train": list(fold.train), "val": list(fold.val)}
        assert all(isinstance(case, str) for case in entry["train"] + entry["val"])
    assert json.loads(json.dumps(document)) == document  # plain JSON, as nnU-Net loads it
    assert splits_final(make_splits(cases, SplitSpec.parse("train-site:A"))) == [
        {"train": [f"A-{i:03d}" for i in range(4)], "val": [f"B-{i:03d}" for i in range(4)]}
    ]
