"""The documentation stays true: every test the bad-input page cites exists, the README stays a short guide, code
cites docs/ pages rather than README sections, every recipe the README names is a file, and the main job's figures
are its results files', as is the Sew study's table (tests/test_docs_run.py runs what the docs show)."""

import json
import re
import statistics
import sys
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


def _results_runs(file: str, variant: str | None) -> list[tuple[int, float, float]]:
    """(seed, test R@1, test mAP) of each run in a results file: a sweep's runs of one variant, or the main job's
    runs (main_job_cpu.json: its seed is the one its `how` states)."""
    data = json.loads((REPO / "benchmarks" / "results" / file).read_text())
    if "how" in data:
        seed = int(re.search(r"seed (\d+)", data["how"]).group(1))
        return [(seed, run["test"]["R1"], run["test"]["mAP"]) for run in data["runs"]]
    return [(run["seed"], run["metrics"]["R1"], run["metrics"]["mAP"]) for run in data["runs"]
            if run["variant"] == variant and run["error"] is None]


def test_the_main_job_table_states_what_its_results_files_hold():
    """The main-job figures (what a newcomer's `make train` is compared with) are the results files' numbers."""
    page = (REPO / "benchmarks" / "README.md").read_text()
    section = page.split("## The main job (`make train`)", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and ".json" in line]
    assert len(rows) >= 2
    for seeds_cell, _, _, r1_cell, map_cell, file_cell in rows:
        seeds = [int(seed) for seed in re.findall(r"^\d+(?:, \d+)*", seeds_cell)[0].split(", ")]
        file = re.search(r"`(\w+\.json)`", file_cell).group(1)
        variant = re.search(r"variant `([\w-]+)`", file_cell)
        runs = [run for run in _results_runs(file, variant and variant.group(1)) if run[0] in seeds]
        assert sorted({run[0] for run in runs}) == sorted(seeds), (file, seeds_cell)
        for column, cell in ((1, r1_cell), (2, map_cell)):
            values = [run[column] for run in runs]
            if len(seeds) == 1:
                assert {f"{value:.2f}" for value in values} == {cell}, (file, seeds_cell, cell, values)
            else:
                mean, std = statistics.mean(values), statistics.stdev(values)
                assert cell.startswith(f"{mean:.2f} ± {std:.2f}"), (file, cell, mean, std)
                if "to" in cell:
                    assert cell.endswith(f"({min(values):.2f} to {max(values):.2f})"), (file, cell)


def test_the_sew_study_table_is_its_results_file():
    """docs/findings.md's Sew-study table is what `benchmarks/sew_study.py --report` renders from the results file,
    so the page and the file cannot disagree (the study rewrites the file after every run)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sew_study

    payload = json.loads((REPO / "benchmarks" / "results" / "sew_study_cpu.json").read_text())
    page = (REPO / "docs" / "findings.md").read_text()
    shown = sew_study.shown_table(page)
    assert shown == sew_study.table(payload["summary"])
    assert sew_study.with_table(page, shown) == page  # --report rewrites the table and nothing else
    assert "sew-study-table" not in (REPO / "benchmarks" / "README.md").read_text()  # one page shows it
    # Every run finished so far is in the table, on its variant's row.
    finished = {(run["variant"], run["seed"]) for run in payload["runs"] if run["metrics"]}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in shown.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert finished == {(variant, int(seed)) for variant, seeds in rows.items() for seed in seeds.split(", ")}
