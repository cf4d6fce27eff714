"""Every chapter can run where diffcore is not installed (Colab, Binder): its first code cell
installs diffcore from the book's repository, before anything imports it, and the book hides
that cell.  The repository's address is written in _config.yml; the cells must agree with it."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_every_chapter_is_found():
    assert len(NOTEBOOKS) >= 13, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_first_code_cell_installs_diffcore_from_the_repository(path):
    url = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
    first = _code_cells(path)[0]
    source = _source(first)
    assert f'"git+{url}"' in source, f"{path.name}: the install cell must name {url}"
    assert 'find_spec("diffcore") is None' in source, f"{path.name}: install only when missing"
    assert "remove-cell" in first["metadata"].get("tags", []), f"{path.name}: not hidden"
    # the same cell in every chapter
    assert source == _source(_code_cells(NOTEBOOKS[0])[0])
    assert not any(
        line.startswith(("from diffcore", "import diffcore")) for line in source.splitlines()
    )


def test_binder_builds_the_pinned_environment_with_the_cpu_build_of_torch():
    """Binder reads only .binder/: it must pull in requirements.txt, with PyTorch's CPU index
    beside PyPI (``torch==X`` then resolves to ``X+cpu``), on a Python that diffcore supports."""
    binder = ROOT / ".binder"
    lines = (binder / "requirements.txt").read_text(encoding="utf-8").splitlines()
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines, lines
    included = [(binder / line[3:]).resolve() for line in lines if line.startswith("-r ")]
    assert included == [ROOT / "requirements.txt"], included
    pins = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("torch==") for line in pins)

    runtime = (binder / "runtime.txt").read_text(encoding="utf-8").strip()
    match = re.fullmatch(r"python-3\.(\d+)", runtime)
    assert match, runtime
    requires = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert requires and int(match[1]) >= int(requires[1]), (runtime, requires)


def test_the_pages_workflow_runs_the_readme_commands():
    """The workflow that publishes the book runs the README's two commands and nothing of its
    own: the tests through .ci/run (which calls make test), the book through make book, whose
    output it deploys; the README and the citation name the same online address."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    runs = [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step
    ]
    assert runs == ['sudo -E env "PATH=$PATH" ./.ci/run', "make book"], runs
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = readme.split("```")[1]
    assert "make book" in first and "make test" in first, first
    uploads = [
        step["with"]["path"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/upload-pages-artifact")
    ]
    assert uploads == ["_build/html"], uploads
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert (
        citation["url"] in readme and citation["url"] in (ROOT / "book" / "preface.md").read_text()
    )
    assert (
        citation["repository-code"]
        == yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
    )


def test_the_chapters_read_like_a_book():
    """The targets of the book's style, measured as ``benchmarks/readability.py`` prints them:
    the median visible code cell at most 8 lines, at most 10% of visible cells over 20 lines,
    no function defined in two notebooks, more diffcore than matplotlib calls in every
    chapter's visible cells, and at most 60 functions and classes in all notebooks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import readability
    finally:
        sys.path.pop(0)
    figures = readability.measure(NOTEBOOKS)
    assert figures["median"] <= 8, figures["median"]
    assert figures["over_20_share"] <= 0.10, figures["over_20_share"]
    assert not figures["repeated"], figures["repeated"]
    assert figures["definitions"] <= 60, figures["definitions"]
    heavy = [r["chapter"] for r in figures["rows"] if r["diffcore"] <= r["matplotlib"]]
    assert not heavy, heavy


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_chapter_ends_with_exercises_whose_solutions_run(path):
    """Two to four exercises at the end; each has a gated, hidden solution with code that
    asserts its answer (so that nbval runs it)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells]
    labels = re.findall(r"```\{exercise\}[^\n]*\n:label: (\S+)", "\n".join(sources))
    assert 2 <= len(labels) <= 4, (path.name, labels)
    for label in labels:
        start = next(i for i, s in enumerate(sources) if f"{{solution-start}} {label}" in s)
        assert ":class: dropdown" in sources[start], (path.name, label)
        end = next(i for i in range(start, len(cells)) if "{solution-end}" in sources[i])
        code = [
            s
            for c, s in zip(cells[start:end], sources[start:end], strict=True)
            if c["cell_type"] == "code"
        ]
        assert code and any("assert" in s for s in code), (path.name, label)
