"""Train/val/test splits by group (lesion or case), stratified by class, or from an official split file.

A group is everything that must stay on one side: the images of one lesion, or the slices of one case.
Groups are ordered by a hash of (seed, group id), so a split depends neither on Python's hash seed nor on
the order of the table. Each stratum (class) is spread
evenly over the ordering, then the ordering is cut by the fractions: the split is stratified and the
totals match the fractions as closely as whole groups allow. Where the fractions would round a split to
nothing, validation (and, from 3 groups, test) still receives one group, because DET measures on validation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from medfl.data.problems import ProblemLog
from medfl.data.tables import read_table

SPLITS = ("train", "val", "test")


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def _split_sizes(total: int, fractions: Sequence[float]) -> tuple[int, int]:
    """(validation, test) group counts: rounded shares, at least one each when possible, one left to train."""
    n_val = math.floor(total * fractions[1] + 0.5)
    n_test = math.floor(total * fractions[2] + 0.5)
    if fractions[1] > 0 and total >= 2:
        n_val = max(1, n_val)
    if fractions[2] > 0 and total >= 3:
        n_test = max(1, n_test)
    while n_val + n_test > max(total - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def split_groups(strata: Mapping[str, str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign every group to "train", "val" or "test".

    `strata` maps group id -> stratum (the group's class; one common value when not stratifying).
    Every stratum keeps at least one group in train.
    """
    by_stratum: dict[str, list[str]] = {}
    for group, stratum in strata.items():
        by_stratum.setdefault(stratum, []).append(group)
    positions: list[tuple[float, str, str]] = []
    for members in by_stratum.values():
        members.sort(key=lambda g: _order_key(seed, g))
        positions += [((rank + 0.5) / len(members), _order_key(seed, g), g) for rank, g in enumerate(members)]
    positions.sort()
    n_val, n_test = _split_sizes(len(positions), fractions)
    assignment = {}
    for index, (_, _, group) in enumerate(positions):
        assignment[group] = "val" if index < n_val else "test" if index < n_val + n_test else "train"
    for members in by_stratum.values():
        if all(assignment[g] != "train" for g in members):
            assignment[members[-1]] = "train"
    return assignment


def read_split_file(path: Path, log: ProblemLog) -> dict[str, str] | None:
    """An official split: CSV with header `id,split`, split in train/val/test; None when unusable."""
    rows = read_table(path, ["id", "split"], log, what="split file")
    if rows is None:
        return None
    splits: dict[str, str] = {}
    ok = True
    for row in rows:
        split = row["split"].lower()
        if split not in SPLITS:
            log.error(f"id '{row['id']}': split '{row['split']}' is not one of train, val, test", path,
                      kind="invalid split value")
            ok = False
        elif row["id"] in splits and splits[row["id"]] != split:
            log.error(f"id '{row['id']}' is listed in both {splits[row['id']]} and {split}", path,
                      kind="conflicting split entries")
            ok = False
        else:
            splits[row["id"]] = split
    return splits if ok else None


def assign_splits(groups: Mapping[str, str], strata: Mapping[str, str], split_file: Path | None,
                  fractions: Sequence[float], seed: int, log: ProblemLog, ignore_case: bool = False) -> dict[str, str]:
    """Each sample id's split: from the site's official split file, or by its group (lesion, case) with the
    groups stratified (by class; one stratum when not stratifying).

    `groups`: sample id -> group id; `strata`: group id -> stratum. With `ignore_case` the file's ids match in
    any case (the returned ids are then lower-case) and ids it lists that the site lacks are warned about.
    """
    if split_file is not None:
        official = read_split_file(split_file, log)
        if official is None:
            return {}
        ids = list(groups)
        if ignore_case:
            ids, official = [i.lower() for i in ids], {k.lower(): v for k, v in official.items()}
            for unknown in sorted(official.keys() - set(ids)):
                log.warning(f"case '{unknown}' is listed but not among the site's usable cases", split_file,
                            kind="split file lists an unknown case")
        return assign_from_file(ids, official, split_file, log)
    by_group = split_groups(strata, fractions, seed)
    return {(i.lower() if ignore_case else i): by_group[group] for i, group in groups.items()}


def assign_from_file(ids: Sequence[str], official: Mapping[str, str], path: Path, log: ProblemLog) -> dict[str, str]:
    """Each id's split per the official file; ids the file does not list are errors (and left out)."""
    assignment = {}
    for item in ids:
        if item in official:
            assignment[item] = official[item]
        else:
            log.error(f"id '{item}' is not listed in the split file", path, kind="id missing from split file")
    return assignment
