"""Render a local HTML page in a real headless Chromium (Debian's ``chromium``), for tests.

No DevTools protocol: a copy of the page gets a small script that, once every image has
loaded or failed, writes what it found (each image's natural size, the tables, the section
ids) as JSON into a ``<pre id="browser-check">``; ``chromium --dump-dom`` prints the DOM
after the page's load event, and ``--screenshot`` saves what a person would see.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                                 naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
  const tables = [...document.querySelectorAll("table")].map(t => ({id: t.id, rows: t.rows.length}));
  const sections = [...document.querySelectorAll("[id]")].map(e => e.id);
  const external = [...document.querySelectorAll("[src],link[href]")]
    .map(e => e.getAttribute("src") || e.getAttribute("href")).filter(u => !u.startsWith("data:"));
  const pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify({images, tables, sections, external, title: document.title});
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    """The Chromium binary; a clear failure (not a skip) when it is missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("chromium is not installed: run 'apt-get install chromium' (make test installs it as root)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=10000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


def inspect_page(html_path: str | Path, work: str | Path, timeout: float = 120.0) -> dict:
    """Load ``html_path`` (a copy with the check script) and return what the browser saw."""
    html_path, work = Path(html_path), Path(work)
    page = html_path.read_text(encoding="utf-8")
    assert "</body>" in page, f"{html_path} has no </body>"
    probe = work / f"{html_path.stem}.probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>", 1), encoding="utf-8")
    res = _run(["--dump-dom", probe.resolve().as_uri()], timeout)
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', res.stdout, re.S)
    assert m, f"chromium did not run the page's check script (exit {res.returncode}):\n{res.stderr[-3000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 3000,
               timeout: float = 120.0) -> Path:
    png_path = Path(png_path).resolve()
    res = _run([f"--screenshot={png_path}", f"--window-size={width},{height}", Path(html_path).resolve().as_uri()],
               timeout)
    assert png_path.is_file() and png_path.stat().st_size > 0, \
        f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-3000:]}"
    return png_path
