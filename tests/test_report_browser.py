"""The HTML report opened in headless Chromium (Debian's `chromium` package): every section renders,
no image is broken, no table is empty, and the screenshot is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from polytask.cli.main import main
from polytask.diagnostics.report import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Appended to a copy of the page (the report itself has no script): after load, it counts what
# did not render into attributes of <body>, which --dump-dom then shows.
PROBE = """<script>
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const empty = [...document.querySelectorAll('table')].filter(t => t.querySelectorAll('tbody tr').length === 0).length;
  const blank = [...document.querySelectorAll('section')].filter(s => s.innerText.trim().split('\\n').length < 2).length;
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken', broken);
  document.body.setAttribute('data-empty-tables', empty);
  document.body.setAttribute('data-blank-sections', blank);
});
</script></body>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium; "
                                             ".ci/run installs it)")
def test_report_renders_every_section_in_headless_chromium(tmp_path):
    def train(name, **extra):
        cfg = {"seed": 0, "output_dir": str(tmp_path / name), "data": {"dataset": "adult", "options": {"rows": 600}},
               "tasks": {"income": {"kind": "binary"}, "marital": {"kind": "binary"}},
               "model": {"architecture": "hard_sharing", "encoder": {"name": "mlp", "hidden": [16]}},
               "method": "equal", "train": {"epochs": 2, "batch_size": 100}, "run": {"progress": False}, **extra}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
        return tmp_path / name

    full = train("full", method="pcgrad", health={"every": 2}, callbacks=[{"name": "diagnostics", "affinity_every": 2}])
    bare = train("bare")
    report = tmp_path / "report.html"
    assert main(["report", str(full), str(bare), "--output", str(report)]) == 0
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE))

    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    attrs = dict(re.findall(r'data-([\w-]+)="(\d+)"', body.group(1)))
    # full: curves, weights, conflict, affinity, health; bare: curves, weights; the comparison
    assert attrs["images"] == "8" and attrs["broken"] == "0" and attrs["empty-tables"] == "0", attrs
    assert attrs["blank-sections"] == "0", attrs
    for anchor, title in SECTIONS:
        assert f'id="{anchor}"' in dom.stdout and title in dom.stdout

    shot = tmp_path / "report.png"
    taken = _chromium(tmp_path, "--window-size=1200,4000", f"--screenshot={shot}", report.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] == 4000 and pixels.shape[1] == 1200
    assert (pixels[..., :3] < 0.5).mean() > 0.005  # text and plots, not a blank page
