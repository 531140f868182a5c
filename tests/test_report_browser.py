"""The HTML report opens in a real browser: headless Chromium renders it, every image
loads (decoded, non-zero size) and every link points at something that exists.

Skips with one line when no Chromium is installed (CI installs the Debian package)."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from mtl_tune.analysis.synthetic import write_baseline_sweep, write_toy_sweep
from mtl_tune.analyze import main

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")]

#: runs after every image has loaded or failed; the result lands in the dumped DOM
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth};
  });
  var links = Array.from(document.querySelectorAll('a[href]')).map(function (a) {
    return {href: a.getAttribute('href'), url: a.href};
  });
  var pre = document.createElement('pre');
  pre.id = 'browser-check';
  pre.textContent = JSON.stringify({images: imgs, links: links, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def render(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after Chromium has loaded it and run its scripts."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--allow-file-access-from-files", "--virtual-time-budget=10000",
             "--dump-dom", page.as_uri()]
    proc = subprocess.run([BROWSER, *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def browser_check(report: Path, profile: Path) -> dict:
    probe = report.with_name("_browser_check.html")
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    dom = render(probe, profile)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, "the check script did not run: " + dom[-500:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


def broken_links(links: list[dict], dom_ids: set[str]) -> list[str]:
    broken = []
    for link in links:
        url = urlparse(link["url"])
        if url.scheme == "file":
            target = Path(unquote(url.path))
            if not target.exists() or (url.fragment and url.fragment not in dom_ids and target.suffix == ".html"):
                broken.append(link["href"])
        elif url.scheme not in ("http", "https", "mailto"):
            broken.append(link["href"])
    return broken


def test_html_report_renders_with_every_image_and_link(tmp_path):
    sweeps = [write_toy_sweep(tmp_path / "toy"), write_baseline_sweep(tmp_path / "city")]
    out = tmp_path / "report"
    assert main([*map(str, sweeps), "--out", str(out), "--format", "html"]) == 0
    report = out / "report.html"
    result = browser_check(report, tmp_path / "profile")
    assert result["title"] == "mtl_tune sweep analysis"
    srcs = re.findall(r'<img src="([^"]+)"', report.read_text())
    assert len(result["images"]) == len(srcs) >= 5  # the browser saw every image of the page
    bad = [i["src"] for i in result["images"] if not i["ok"]]
    assert not bad, f"images that did not load: {bad}"
    ids = set(re.findall(r'id="([^"]+)"', report.read_text()))
    assert not broken_links(result["links"], ids)


def test_the_check_itself_catches_a_missing_image_and_a_broken_link(tmp_path):
    page = tmp_path / "report.html"
    (tmp_path / "real.png").write_bytes(b"")  # empty file: not a decodable image
    page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><h1 id="top">t</h1><img src="gone.png">'
                    '<img src="real.png"><a href="missing.html">x</a><a href="#top">y</a><a href="#nowhere">z</a>'
                    '<a href="real.png">ok</a></body></html>')
    result = browser_check(page, tmp_path / "profile")
    assert [i["ok"] for i in result["images"]] == [False, False]
    assert broken_links(result["links"], {"top"}) == ["missing.html", "#nowhere"]
