"""docs/reliability.md cannot rot: every row of its tables names at least one test, and every test
it names exists (file, function and parametrized case), so renaming or deleting a test without
updating the page fails here. The page must also list at least 40 fault classes."""

import ast
import re

from helpers import ROOT

DOC = ROOT / "docs" / "reliability.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)(?:\[([^\]`]+)\])?`")


def table_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and cells[0] != "fault class" and not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows


def test_every_row_names_a_behaviour_and_a_test_that_exists():
    rows = table_rows()
    assert rows, "no table found"
    functions: dict[str, set[str]] = {}
    for fault, behaviour, tests in rows:
        assert behaviour, f"row '{fault}' says nothing about the behaviour"
        refs = TEST_REF.findall(tests)
        assert refs, f"row '{fault}' names no test"
        for path, name, case in refs:
            assert (ROOT / path).is_file(), f"row '{fault}': {path} does not exist"
            if path not in functions:
                tree = ast.parse((ROOT / path).read_text())
                functions[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in functions[path], f"row '{fault}': no {name} in {path}"
            if case:
                assert f'"{case}"' in (ROOT / path).read_text(), f"row '{fault}': no case '{case}' in {path}"


def test_at_least_40_fault_classes():
    assert len(table_rows()) >= 40, len(table_rows())


def test_the_checker_catches_a_missing_test():
    """The reference pattern really matches the page's references (the checks above are not vacuous)."""
    refs = TEST_REF.findall(DOC.read_text())
    assert len(refs) >= len(table_rows())
    assert not TEST_REF.findall("`tests/test_nope.py::helper`")  # only test_ functions count
