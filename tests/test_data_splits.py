"""Group splits (stratified, seeded, whole groups) and official split files."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import write_csv

from medfl.data.problems import ProblemLog
from medfl.data.splits import assign_from_file, read_split_file, split_groups

FRACTIONS = (0.7, 0.1, 0.2)


def _strata(counts: dict[str, int]) -> dict[str, str]:
    return {f"{label}{i}": label for label, n in counts.items() for i in range(n)}


def test_sizes_follow_the_fractions_and_each_class_is_spread():
    strata = _strata({"nv": 60, "bkl": 25, "mel": 15})
    assignment = split_groups(strata, FRACTIONS, seed=0)
    assert Counter(assignment.values()) == {"train": 70, "val": 10, "test": 20}
    for label, n in {"nv": 60, "bkl": 25, "mel": 15}.items():
        per_split = Counter(s for g, s in assignment.items() if strata[g] == label)
        assert abs(per_split["train"] - 0.7 * n) <= 1.5 and per_split["val"] >= 1 and per_split["test"] >= 2


def test_same_seed_same_split_other_seed_other_split_order_irrelevant():
    strata = _strata({"a": 20, "b": 20})
    first = split_groups(strata, FRACTIONS, seed=1)
    assert split_groups(dict(reversed(list(strata.items()))), FRACTIONS, seed=1) == first
    assert split_groups(strata, FRACTIONS, seed=2) != first


@pytest.mark.parametrize(
    ("groups", "expected"),
    [(1, {"train": 1}), (2, {"train": 1, "val": 1}), (3, {"train": 1, "val": 1, "test": 1}),
     (4, {"train": 2, "val": 1, "test": 1}), (10, {"train": 7, "val": 1, "test": 2})],
)
def test_small_sites_still_get_a_validation_group(groups, expected):
    assignment = split_groups(dict.fromkeys(range(groups), "case"), FRACTIONS, seed=0)
    assert Counter(assignment.values()) == expected


def test_every_class_keeps_a_training_group():
    strata = {"n1": "nv", "n2": "nv", "n3": "nv", "n4": "nv", "rare": "mel"}
    assignment = split_groups(strata, (0.4, 0.3, 0.3), seed=0)
    assert assignment["rare"] == "train"


def test_zero_test_fraction_gives_no_test_groups():
    assignment = split_groups(dict.fromkeys(range(10), "case"), (0.8, 0.2, 0.0), seed=0)
    assert Counter(assignment.values()) == {"train": 8, "val": 2}


def test_split_file_is_read_and_applied(tmp_path):
    path = write_csv(tmp_path / "split.csv", ["id", "split"], [("a", "train"), ("b", "VAL"), ("c", "test")])
    log = ProblemLog("s")
    official = read_split_file(path, log)
    assert official == {"a": "train", "b": "val", "c": "test"}
    assert assign_from_file(["a", "c", "d"], official, path, log) == {"a": "train", "c": "test"}
    assert [p.message for p in log.problems()] == ["id 'd' is not listed in the split file"]


@pytest.mark.parametrize(
    ("header", "rows", "expected"),
    [
        (["id", "split"], [("a", "training")], "id 'a': split 'training' is not one of train, val, test"),
        (["id", "split"], [("a", "train"), ("a", "test")], "id 'a' is listed in both train and test"),
        (["image", "fold"], [("a", "1")], "split file lacks column(s) id, split"),
    ],
)
def test_bad_split_files_are_errors(tmp_path, header, rows, expected):
    path = write_csv(tmp_path / "split.csv", header, rows)
    log = ProblemLog("s")
    assert read_split_file(path, log) is None
    assert expected in log.problems()[0].message and log.problems()[0].file == str(path)
