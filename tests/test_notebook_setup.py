"""Every chapter can run where diffcore is not installed (Colab, Binder): its first code cell
installs diffcore from the book's repository, before anything imports it, and the book hides
that cell.  The repository's address is written in _config.yml; the cells must agree with it."""

import json
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
