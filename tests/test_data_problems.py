"""Problem lines and their collection."""

from __future__ import annotations

from medfl.data.problems import Problem, ProblemLog


def test_problem_line_names_site_file_and_problem():
    assert str(Problem("derm_a", "/x/table.csv", "label 'foo' is unknown")) == \
        "site 'derm_a': /x/table.csv: label 'foo' is unknown"
    assert str(Problem("derm_a", None, "no samples")) == "site 'derm_a': no samples"


def test_errors_come_first_and_many_of_a_kind_fold_into_one_line():
    log = ProblemLog("s", limit=3)
    log.warning("class 'mel' is absent from the test split")
    for i in range(7):
        log.error(f"image {i} missing", f"/t{i}.jpg", kind="image listed but absent")
    problems = log.problems()
    assert [p.severity for p in problems] == ["error"] * 4 + ["warning"]
    assert [p.file for p in problems[:3]] == ["/t0.jpg", "/t1.jpg", "/t2.jpg"]
    assert problems[3].message == "... and 4 more: image listed but absent"
    assert log.has_errors


def test_only_warnings_are_not_errors():
    log = ProblemLog("s")
    log.warning("something odd")
    assert not log.has_errors and len(log.problems()) == 1
