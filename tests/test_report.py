"""apd report writes a self-contained page with the figures a researcher
looks at; where Debian's chromium is installed, the page is rendered headless
and the screenshot checked for content."""

import base64
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from apdkit.cli.main import app

runner = CliRunner()
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def report_page(id_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("report") / "run.zarr"
    shutil.copytree(id_store, store)
    for args in (["group", "--store", str(store), "--name", "r", "-q"],
                 ["verify", "--store", str(store), "--method", "r", "-q"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    out = store.parent / "report.html"
    result = runner.invoke(app, ["report", str(store), "--out", str(out), "--method", "r"])
    assert result.exit_code == 0, result.output
    return out


def test_report_is_self_contained_with_figures_and_verify_table(report_page):
    page = report_page.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # loss curves, co-activation graph, TMS directions
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verify: all checks passed" in page
    assert "faithfulness" in page and "minimality" in page and "simplicity" in page
    assert "http" not in page  # nothing fetched from elsewhere


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report_page, tmp_path):
    """It loads, the page's scripts log nothing to the console, the figures
    are in the rendered DOM, and the screenshot is not blank."""
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", report_page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert dom.stdout.count('<img src="data:image/png;base64,') == 3
    assert "Verify: all checks passed" in dom.stdout and dom.stdout.count("class=\"card\"") >= 6
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={shot}",
                    "--window-size=1100,2400", report_page.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1100, 2400)
    colours = img.getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # text and plots, not a blank page


def test_report_has_mechanism_cards_and_the_identity_panel(report_page):
    page = report_page.read_text()
    cards = re.findall(r"<div class='card'><b>mechanism (\d+)</b>", page)
    assert len(cards) >= 6  # 5 features and the identity, each its own card
    assert "ablating it: output change" in page and "top inputs: #" in page
    identity = page[page.index("<h3>Identity</h3>"):]
    assert "<td>hidden</td>" in identity and "<td>yes</td>" in identity.split("</table>")[0]
    assert "class='warn'" not in page  # a passing run has nothing to warn about


def test_report_escapes_user_text_and_warns_when_verify_failed(report_page, tmp_path):
    import json

    store = tmp_path / "evil.zarr"
    shutil.copytree(report_page.parent / "run.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["apd"]["model"] = "<script>alert(1)</script>"
    (store / "zarr.json").write_text(json.dumps(meta))
    ver_meta = store / "verify" / "r" / "zarr.json"
    v = json.loads(ver_meta.read_text())
    v["attributes"]["passed"] = False
    v["attributes"]["checks"]["minimality"]["passed"] = False
    ver_meta.write_text(json.dumps(v))
    out = tmp_path / "evil.html"
    result = runner.invoke(app, ["report", str(store), "--out", str(out), "--method", "r"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "class='warn'>verify FAILED: minimality" in page
