"""The report in a real browser: headless Chromium loads it with no console message, the overall
verdict is in the DOM and visible on screen, and a screenshot is kept as a CI artifact.

The report is built from tests/data/h100-trimmed-results.jsonl: a few items of a real H100
sign-off run (`nox -s falsify -- --signoff`), with their long series thinned so the file stays
small: NVML memory timelines with their budget lines (FT-Q4K-TEACHER-002 and -005, each with its
control), logit-parity scatters (003), the KD loss curve (005), Hypothesis statistics
(VOCAB-ALIGN-005/007).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from harness.report import build_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "h100-trimmed-results.jsonl"
ARTIFACTS = ROOT / "reports" / "ci-artifacts"
NOT_READY_RED = (0xCF, 0x22, 0x2E)  # .banner.notready in harness/templates/report.html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


def _run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def console_messages(stderr: str) -> list[str]:
    """Every console line Chromium logged (``--enable-logging=stderr``): the report has no script,
    so any message at all (an error, a blocked resource, a CSP report) is a defect."""
    return [ln for ln in stderr.splitlines() if re.search(r":CONSOLE[:(]\d*\)?\]|Uncaught", ln)]


def load(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after load, and the console messages of that load."""
    proc = _run_chromium(profile, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, console_messages(proc.stderr)


def screenshot(page: Path, profile: Path, out: Path, size: str = "1280,2000") -> None:
    proc = _run_chromium(profile, f"--screenshot={out}", f"--window-size={size}", page.as_uri())
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]


def png_rows(path: Path, rows: int) -> tuple[int, list[bytes]]:
    """Decode the first ``rows`` scanlines of an 8-bit RGB/RGBA PNG to RGB(A) bytes (no PIL here)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, bpp = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, _h, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    out: list[bytes] = []
    prev = bytearray(stride)
    for r in range(rows):
        filt = raw[r * (stride + 1)]
        line = bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 255
            elif filt == 2:
                line[i] = (line[i] + b) & 255
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(bytes(line))
        prev = line
    return bpp, out


def count_color(path: Path, rgb: tuple[int, int, int], rows: int = 160) -> int:
    bpp, lines = png_rows(path, rows)
    return sum(1 for line in lines for i in range(0, len(line), bpp) if tuple(line[i:i + 3]) == rgb)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    built = build_report(FIXTURE, out, previous=None)
    assert built.overall["label"] == "NOT READY"
    return built.paths["html"]


def test_fixture_is_small_and_has_real_series() -> None:
    text = FIXTURE.read_text()
    assert FIXTURE.stat().st_size < 200_000
    for name in ("gpu_memory_timeline", "vs_f32_dequant_parity", "kd_loss", "hypothesis_examples"):
        assert name in text


def test_report_loads_without_console_messages_and_shows_the_verdict(report: Path, tmp_path: Path) -> None:
    dom, console = load(report, tmp_path / "profile")
    assert console == []
    verdict = re.search(r'<h1 id="overall-verdict">([^<]*)</h1>', dom)
    assert verdict is not None and verdict.group(1) == "NOT READY"
    assert dom.count("<svg") >= 6  # the memory, parity, loss and Hypothesis charts are in the page
    # visible, not just present: the red NOT READY banner is painted at the top of the screen
    shot = tmp_path / "report.png"
    screenshot(report, tmp_path / "profile2", shot)
    assert count_color(shot, NOT_READY_RED) > 20_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-h100-fixture.png")


def test_console_check_catches_a_script_error(tmp_path: Path) -> None:
    """The console check can fail: a page that logs and throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><h1 id="overall-verdict">X</h1>'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    _dom, console = load(page, tmp_path / "profile")
    assert any("boom" in c for c in console) and any("Uncaught ReferenceError" in c for c in console)


def test_visibility_check_catches_a_hidden_banner(report: Path, tmp_path: Path) -> None:
    """The pixel check can fail: the same report with its banner hidden has no red at the top."""
    hidden = tmp_path / "hidden.html"
    hidden.write_text(report.read_text().replace("</style>", ".banner { display: none; }</style>", 1))
    shot = tmp_path / "hidden.png"
    screenshot(hidden, tmp_path / "profile", shot, size="1280,400")
    assert count_color(shot, NOT_READY_RED) < 500
