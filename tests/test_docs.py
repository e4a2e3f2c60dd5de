"""The documentation stays true: every test the bad-input page cites exists, the README stays a short guide, code
cites docs/ pages rather than README sections, and every recipe the README names is a file."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _test_names() -> set[str]:
    return {name for path in (REPO / "tests").glob("test_*.py")
            for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE)}


def test_every_test_the_bad_input_page_cites_exists():
    cited = set(re.findall(r"`(?:[\w/]+\.py::)?(test_\w+)`", (REPO / "docs" / "bad-input.md").read_text()))
    assert len(cited) > 20
    assert cited <= _test_names(), sorted(cited - _test_names())


def test_the_readme_is_a_short_guide_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)", readme):
        assert (REPO / target).exists(), target
    for recipe in re.findall(r"recipes/[\w-]+\.json", readme):
        assert (REPO / recipe).is_file(), recipe


def test_no_code_cites_a_readme_section():
    citing = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if re.search(r"README[,'\" ]+[\"'(]?[A-Z][a-z]+", line) and "README.md" not in line:
                citing.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not citing, citing
