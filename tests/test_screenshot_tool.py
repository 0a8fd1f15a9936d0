"""harness/screenshot.py: the whole page, measured, in one PNG (headless Chromium)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from harness import screenshot as screenshot_report
from harness.report import build_report
from tests.test_report_browser import CHROMIUM, FIXTURE, NOT_READY_RED, count_color

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_the_whole_report_is_captured(tmp_path: Path) -> None:
    html = build_report(FIXTURE, tmp_path / "r", previous=None).paths["html"]
    out = tmp_path / "shot.png"
    assert screenshot_report.main([str(html), "-o", str(out)]) == 0
    width, height = png_size(out)
    short = tmp_path / "short.html"  # the same page cut to its banner: measured much shorter
    short.write_text(html.read_text().split("<nav", 1)[0] + "</body></html>")
    assert screenshot_report.screenshot(short, tmp_path / "short.png", str(CHROMIUM)) < 600
    assert width == 1280 and height > 3000, (width, height)
    assert count_color(out, NOT_READY_RED) > 20_000  # the banner is painted at the top


def test_a_missing_report_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert screenshot_report.main([str(tmp_path / "nope.html"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
