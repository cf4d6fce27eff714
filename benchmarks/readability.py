"""How the chapters read: the code a reader of the book sees, chapter by chapter.

A code cell is *visible* when the book shows its source: not tagged ``remove-cell``,
``remove-input`` or ``hide-input`` (the last shows a "show code" toggle instead).  Per chapter,
this prints the visible code cells, their median length in lines, how many run over 20 lines,
the functions and classes the notebook defines, and the calls the visible cells make into
diffcore (``name.attr(`` with ``name`` a diffcore module imported by the notebook, or a name
imported from one) against their matplotlib calls (``plt.``, ``ax.``, ``axes.``, ``fig.``
and ``axs.`` calls).  Then the totals and the targets of the book's style: the median visible
cell at most 8 lines, at most 10% of visible cells over 20 lines, no function defined in two
notebooks, and more diffcore than matplotlib calls in every chapter.

Run: ``.venv/bin/python benchmarks/readability.py``
"""

from __future__ import annotations

import ast
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = {"remove-cell", "remove-input", "hide-input"}
PLOT_CALL = re.compile(r"\b(plt|ax|axes|axs|fig|ax\d|ax_\w+)(\[[^\]]*\])*\.\w+\(")


def _cells(path: Path) -> list[tuple[str, set[str]]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [
        ("".join(c["source"]), set(c.get("metadata", {}).get("tags", [])))
        for c in cells
        if c["cell_type"] == "code"
    ]


def _lines(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip())


def _diffcore_names(sources: list[str]) -> set[str]:
    """The names under which the notebook reaches diffcore: modules and imported objects."""
    names: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffcore"):
                names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(
                    (a.asname or a.name).split(".")[0]
                    for a in node.names
                    if a.name.startswith("diffcore")
                )
    return names


def _diffcore_calls(source: str, names: set[str]) -> int:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return 0
    count = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        root = node.func
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        if isinstance(root, ast.Name) and root.id in names:
            count += 1
    return count


def _definitions(source: str) -> list[str]:
    return re.findall(r"^\s*(?:def|class)\s+(\w+)", source, re.M)


def measure(notebooks: list[Path]) -> dict:
    """The figures of every chapter and the totals; see the module docstring."""
    rows, lengths, defined = [], [], Counter()
    where: dict[str, set[str]] = {}
    for path in notebooks:
        cells = _cells(path)
        names = _diffcore_names([source for source, _ in cells])
        visible = [source for source, tags in cells if not tags & HIDDEN]
        sizes = [_lines(source) for source in visible]
        lengths += sizes
        defs = [d for source, _ in cells for d in _definitions(source)]
        for d in defs:
            defined[d] += 1
            where.setdefault(d, set()).add(path.stem)
        rows.append(
            {
                "chapter": path.stem,
                "visible": len(visible),
                "median": statistics.median(sizes) if sizes else 0,
                "over_20": sum(size > 20 for size in sizes),
                "defs": len(defs),
                "diffcore": sum(_diffcore_calls(source, names) for source in visible),
                "matplotlib": sum(len(PLOT_CALL.findall(source)) for source in visible),
            }
        )
    repeated = sorted(name for name, places in where.items() if len(places) > 1)
    return {
        "rows": rows,
        "median": statistics.median(lengths) if lengths else 0,
        "over_20_share": sum(size > 20 for size in lengths) / max(len(lengths), 1),
        "definitions": sum(defined.values()),
        "repeated": repeated,
    }


def main() -> int:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    figures = measure(notebooks)
    header = (
        f"{'chapter':<26}{'visible':>8}{'median':>8}{'>20':>5}{'defs':>6}{'diffcore':>10}{'mpl':>6}"
    )
    print(header)
    for row in figures["rows"]:
        print(
            f"{row['chapter']:<26}{row['visible']:>8}{row['median']:>8.1f}{row['over_20']:>5}"
            f"{row['defs']:>6}{row['diffcore']:>10}{row['matplotlib']:>6}"
        )
    print(
        f"\nall chapters: median visible cell {figures['median']:.1f} lines, "
        f"{100 * figures['over_20_share']:.1f}% over 20 lines, {figures['definitions']} "
        f"functions and classes, defined in two notebooks: {figures['repeated'] or 'none'}"
    )
    targets = {
        "median visible cell <= 8 lines": figures["median"] <= 8,
        "at most 10% of visible cells over 20 lines": figures["over_20_share"] <= 0.10,
        "no function defined in two notebooks": not figures["repeated"],
        "more diffcore than matplotlib calls in every chapter": all(
            r["diffcore"] > r["matplotlib"] for r in figures["rows"]
        ),
    }
    for target, met in targets.items():
        print(f"  [{'ok' if met else 'MISSED'}] {target}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
