"""The book builds without a single warning, and every page renders in a browser.

``test_book_builds_without_warnings``
    Jupyter Book builds the whole book from the committed notebooks, using the outputs
    stored in them (execution is switched off here: nbval executes the notebooks in the
    same test run), with Sphinx's ``-W -n --keep-going``. Any warning fails the test and
    is printed. The build goes to a temporary directory; nothing is written in the
    repository.

``test_pages_render_in_browser``
    The built HTML is served on localhost and every page is opened in headless Chromium
    driven by Playwright. On each page: the math is typeset by MathJax (no raw TeX left,
    no MathJax error), every ``<img>`` has loaded, and no script raised. Requests that
    leave localhost are blocked, except MathJax's CDN, which is answered from a local
    copy installed by ``make test`` (npm package ``mathjax`` under ``.cache/npm``).
    Display equations wider than the text column, and requests to hosts other than
    MathJax's CDN, fail the test too.
    Every kernel-free interactive figure (``diffcore.plot.scrubber``) is found, its slider
    moved, and the picture and its label must change; every chapter with an ipywidgets
    explorer must have at least one such figure.  A full-page screenshot of each page is
    saved under the test's temporary directory, in the theme's light mode and again in its
    dark mode (``dark/``), and also under ``$DIFFCORE_SCREENSHOTS`` when that variable names
    a directory.

Without Chromium, Playwright or the local MathJax, the browser test is skipped with a
message saying what to install; with ``DIFFCORE_REQUIRE_BROWSER=1`` (as in CI) it fails
instead.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MATHJAX_DIR = Path(
    os.environ.get(
        "DIFFCORE_MATHJAX_DIR", ROOT / ".cache" / "npm" / "node_modules" / "mathjax" / "es5"
    )
)
REQUIRE_BROWSER = os.environ.get("DIFFCORE_REQUIRE_BROWSER", "") == "1"
# a full-page screenshot of a long chapter on two busy cores can outlast playwright's default 30 s
SHOT_TIMEOUT_MS = 120_000
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
# Sphinx prints "path:line: WARNING: ..." (and ERROR, CRITICAL, SEVERE); Jupyter Book
# prints its own configuration warnings in a box starting with "[Warning]".
WARNING_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL|SEVERE)\b|\[Warning\]|Validation errors")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SKIPPED_PAGES = {"genindex.html", "search.html"}


@dataclass
class BookBuild:
    html: Path
    returncode: int
    log: str = field(repr=False)

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.log.splitlines() if WARNING_RE.search(line)]


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> BookBuild:
    """Build the book once for this module, without executing the notebooks."""
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    cmd = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(ROOT),
        "--path-output",
        str(out),
        "--config",
        str(config_path),
        "--toc",
        str(ROOT / "_toc.yml"),
        "-W",
        "-n",
        "--keep-going",
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    log = ANSI_RE.sub("", proc.stdout + proc.stderr)
    (out / "build.log").write_text(log, encoding="utf-8")
    return BookBuild(html=out / "_build" / "html", returncode=proc.returncode, log=log)


def test_book_builds_without_warnings(built_book: BookBuild) -> None:
    found = built_book.warnings
    report = "\n".join(found) if found else built_book.log[-6000:]
    assert built_book.returncode == 0 and not found, (
        f"the book build emitted {len(found)} warning(s) "
        f"(exit code {built_book.returncode}):\n{report}"
    )
    assert (built_book.html / "book" / "preface.html").is_file(), "no preface page was built"


# --------------------------------------------------------------------------------------
# Browser check


def _unavailable(message: str) -> None:
    """Skip, or fail when the environment demands the browser test."""
    if REQUIRE_BROWSER:
        pytest.fail(f"{message} (DIFFCORE_REQUIRE_BROWSER=1: the browser test may not be skipped)")
    pytest.skip(message)


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("DIFFCORE_CHROMIUM"),
        shutil.which("chromium"),
        "/usr/bin/chromium",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _pages(html: Path) -> list[Path]:
    """Every built page except the index, search and redirect pages, in a stable order."""
    pages = []
    for path in sorted(html.rglob("*.html")):
        rel = path.relative_to(html)
        if rel.name in SKIPPED_PAGES or any(part.startswith(("_", ".")) for part in rel.parts[:-1]):
            continue
        if 'http-equiv="Refresh"' in path.read_text(encoding="utf-8", errors="replace")[:2000]:
            continue  # the redirect from the site root to the first page
        pages.append(path)
    return pages


def _mathjax_prefixes(pages: list[Path]) -> set[str]:
    """The remote MathJax locations the pages load, up to and including ``/es5/``."""
    prefixes = set()
    pattern = re.compile(r"<script[^>]*\ssrc=\"(https?://[^\"]*mathjax[^\"]*)\"", re.IGNORECASE)
    for page in pages:
        for src in pattern.findall(page.read_text(encoding="utf-8", errors="replace")):
            head, sep, _ = src.partition("/es5/")
            if sep:
                prefixes.add(head + sep)
    return prefixes


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log on the test's output
        pass


@pytest.fixture(scope="module")
def served_book(built_book: BookBuild):
    """Serve the built HTML on an ephemeral localhost port; yields the base URL."""
    if not built_book.html.is_dir():
        pytest.fail(f"the book was not built:\n{built_book.log[-6000:]}")
    handler = functools.partial(_QuietHandler, directory=str(built_book.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# Runs in the page once it has loaded: waits for MathJax and for every image, then
# reports what is wrong. Math is what Sphinx and MyST-NB wrap in span.math / div.math.
CHECK_PAGE_JS = r"""
async () => {
  const report = {
    math: 0, untypeset: [], mathErrors: [], overflow: [], rawTex: [], images: [], nImages: 0,
  };
  const withTimeout = (promise, ms, what) => Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(what + ' timed out')), ms)),
  ]);

  const maths = Array.from(document.querySelectorAll('span.math, div.math'));
  report.math = maths.length;
  if (maths.length) {
    if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
      report.mathErrors.push('MathJax did not load on a page with math');
    } else {
      try {
        await withTimeout(MathJax.startup.promise, 20000, 'MathJax typesetting');
      } catch (err) {
        report.mathErrors.push(String(err));
      }
      report.untypeset = maths
        .filter((el) => !el.querySelector('mjx-container'))
        .map((el) => el.textContent.trim().slice(0, 120));
      for (const el of document.querySelectorAll('mjx-merror, [data-mjx-error]')) {
        report.mathErrors.push(el.getAttribute('data-mjx-error') || el.textContent.slice(0, 120));
      }
      // Display math wider than the text column is cut off (or needs a scroll bar).
      const source = new Map();
      for (const item of (MathJax.startup.document ? MathJax.startup.document.math : [])) {
        source.set(item.typesetRoot, String(item.math).trim());
      }
      for (const el of document.querySelectorAll('div.math')) {
        const box = el.querySelector('mjx-container');
        if (box && box.scrollWidth > el.clientWidth + 2) {
          report.overflow.push((source.get(box) || el.textContent.trim()).slice(0, 100));
        }
      }
      // Undefined macros are typeset in red by MathJax's noundefined extension.
      if (MathJax.startup.document && typeof MathJax.startup.toMML === 'function') {
        for (const item of MathJax.startup.document.math) {
          const mml = MathJax.startup.toMML(item.root);
          const bad = mml.match(/<mtext[^>]*mathcolor="red"[^>]*>\\[^<]*/);
          if (bad || mml.includes('<merror')) {
            const where = String(item.math).slice(0, 80);
            report.mathErrors.push('in ' + where + ': ' + (bad ? bad[0] : 'merror'));
          }
        }
      }
    }
  }

  // Raw TeX in the visible text: what is left once math, code and scripts are removed.
  const body = document.body.cloneNode(true);
  const notText = 'mjx-container, script, style, pre, code, kbd, textarea, noscript, .highlight';
  body.querySelectorAll(notText).forEach((el) => el.remove());
  const text = body.textContent;
  const rawTex = /\\\(|\\\[|\$\$|\\begin\{|\$[^$\s][^$\n]*\\[a-zA-Z]+[^$\n]*\$/g;
  let match;
  while ((match = rawTex.exec(text)) !== null && report.rawTex.length < 5) {
    const around = text.slice(Math.max(0, match.index - 40), match.index + 60);
    report.rawTex.push(around.replace(/\s+/g, ' '));
  }

  // Images: load lazy ones now, wait for all of them, list the broken ones.
  const images = Array.from(document.images);
  report.nImages = images.length;
  images.forEach((img) => { img.loading = 'eager'; });
  await Promise.all(images.map((img) => img.complete ? null : new Promise((resolve) => {
    img.addEventListener('load', resolve);
    img.addEventListener('error', resolve);
    setTimeout(resolve, 10000);
  })));
  report.images = images
    .filter((img) => !(img.complete && img.naturalWidth > 0))
    .map((img) => img.getAttribute('src'));
  return report;
}
"""


# Moves the slider of every kernel-free figure to another frame and reports what changed.
SCRUB_JS = r"""
async () => {
  const found = [];
  for (const root of document.querySelectorAll('.diffcore-scrubber')) {
    const img = root.querySelector('img');
    const slider = root.querySelector('input[type=range]');
    const out = root.querySelector('output');
    if (!img || !slider || !out) {
      found.push({ok: false, what: 'a scrubber lacks its image or slider'});
      continue;
    }
    const src = img.src, label = out.textContent;
    slider.value = slider.value === slider.max ? slider.min : slider.max;
    slider.dispatchEvent(new Event('input', {bubbles: true}));
    try { await img.decode(); } catch (err) { /* a broken frame fails the check below */ }
    const ok = img.src !== src && out.textContent !== label && img.naturalWidth > 0;
    found.push({ok: ok, what: label + ' -> ' + out.textContent});
  }
  return found;
}
"""

DARK_JS = "() => { document.documentElement.dataset.theme = 'dark'; }"


def _chapters_with_explorers() -> set[str]:
    """The pages (``notebooks/NN_name.html``) whose notebook builds an ipywidgets explorer."""
    found = set()
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        if re.search(r"\b(plot|lab)\.explorer\(", path.read_text(encoding="utf-8")):
            found.add(f"notebooks/{path.stem}.html")
    return found


def test_pages_render_in_browser(built_book: BookBuild, served_book: str, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        _unavailable(
            "Chromium not found: install it (Debian/Ubuntu: apt-get install chromium) "
            "or set DIFFCORE_CHROMIUM to its path"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is missing: pip install -r requirements.txt")
    if not (MATHJAX_DIR / "tex-mml-chtml.js").is_file():
        _unavailable(
            f"no local MathJax in {MATHJAX_DIR}: install Node.js and npm, then run `make test` "
            "(it runs npm install --prefix .cache/npm mathjax@3)"
        )

    pages = _pages(built_book.html)
    assert pages, f"no HTML pages in {built_book.html}"
    prefixes = _mathjax_prefixes(pages)
    assert prefixes, "no page loads MathJax, yet the book has math (notation page)"

    shots = [tmp_path / "screenshots"]
    if os.environ.get("DIFFCORE_SCREENSHOTS"):
        shots.append(Path(os.environ["DIFFCORE_SCREENSHOTS"]))
    for directory in shots:
        (directory / "dark").mkdir(parents=True, exist_ok=True)

    mathjax_root = MATHJAX_DIR.resolve()
    blocked: list[str] = []
    missing: list[str] = []

    def route(route) -> None:
        url = route.request.url
        if urlsplit(url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
            return
        for prefix in prefixes:
            if url.startswith(prefix):
                rel = url[len(prefix) :].split("?", 1)[0].split("#", 1)[0]
                local = (mathjax_root / rel).resolve()
                if local.is_file() and mathjax_root in local.parents:
                    route.fulfill(path=str(local))
                else:
                    missing.append(url)
                    route.fulfill(status=404, body="not in the local MathJax copy")
                return
        blocked.append(url)
        route.abort()

    problems: dict[str, list[str]] = {}
    scrubbers: dict[str, int] = {}
    pages_with_math = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", route)
            for path in pages:
                rel = path.relative_to(built_book.html).as_posix()
                page = context.new_page()
                js_errors: list[str] = []
                page.on("pageerror", lambda exc, errors=js_errors: errors.append(str(exc)))
                page.goto(served_book + rel, wait_until="load", timeout=30_000)
                report = page.evaluate(CHECK_PAGE_JS)
                name = rel.replace("/", "__").removesuffix(".html") + ".png"
                for directory in shots:
                    page.screenshot(
                        path=str(directory / name), full_page=True, timeout=SHOT_TIMEOUT_MS
                    )
                scrubbed = page.evaluate(SCRUB_JS)
                page.evaluate(DARK_JS)
                page.wait_for_timeout(100)
                for directory in shots:
                    page.screenshot(
                        path=str(directory / "dark" / name), full_page=True, timeout=SHOT_TIMEOUT_MS
                    )
                page.close()
                scrubbers[rel] = len(scrubbed)

                pages_with_math += report["math"] > 0
                found = []
                if report["untypeset"]:
                    found.append(f"math not typeset: {report['untypeset'][:5]}")
                if report["mathErrors"]:
                    found.append(f"MathJax errors: {report['mathErrors'][:5]}")
                if report["overflow"]:
                    found.append(
                        "display math wider than the text column (split it: aligned, or two "
                        f"displays): {report['overflow'][:5]}"
                    )
                if report["rawTex"]:
                    found.append(f"raw TeX in the text: {report['rawTex']}")
                if report["images"]:
                    broken = report["images"]
                    found.append(
                        f"{len(broken)} of {report['nImages']} images did not load: {broken[:5]}"
                    )
                if js_errors:
                    found.append(f"script errors: {js_errors[:5]}")
                stuck = [s["what"] for s in scrubbed if not s["ok"]]
                if stuck:
                    found.append(f"{len(stuck)} interactive figures did not move: {stuck[:5]}")
                if found:
                    problems[rel] = found
        finally:
            browser.close()

    if blocked:
        # The book must read offline but for MathJax: anything else fetched from another
        # host (widget managers, fonts, trackers) is a dependency a reader may not have.
        problems["(other hosts)"] = [f"requests to other hosts: {sorted(set(blocked))[:10]}"]
    if missing:
        problems["(MathJax)"] = [
            f"files missing from the local MathJax copy: {sorted(set(missing))[:5]}"
        ]
    assert pages_with_math > 0, "no page has math, yet the notation page is full of it"
    for rel in sorted(_chapters_with_explorers()):
        if not scrubbers.get(rel):
            problems.setdefault(rel, []).append(
                "an ipywidgets explorer without a kernel-free twin (plot.scrubber)"
            )
    details = "\n".join(f"{page}:\n  " + "\n  ".join(found) for page, found in problems.items())
    assert not problems, (
        f"{len(problems)} of {len(pages)} pages render badly "
        f"(screenshots in {shots[0]}):\n{details}"
    )
