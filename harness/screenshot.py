#!/usr/bin/env python3
"""Render a report.html to PNG with headless Chromium (standard library only).

    python3 -m harness.screenshot reports/<run-id>/report.html -o docs/report-gpu.png
    python3 -m harness.screenshot REPORT.html -o top.png --height 1400   # the first screen only

Chromium's --screenshot captures the window, not the page, so the page's height is
measured first: a temporary copy of the report with one line of script that writes
document height into the DOM is loaded with --dump-dom (the report itself has no
script). --height cuts the picture instead.
Chromium is looked up as chromium, chromium-browser or google-chrome on PATH
(Debian: apt-get install chromium), or given with --chromium.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: nothing of the user's is read
        return subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=180, check=False)


def page_height(page: Path, chromium: str, width: int) -> int:
    """The rendered height of ``page`` at ``width`` pixels, in CSS pixels."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"  # beside nothing: the report is self-contained
        probe.write_text(page.read_text(encoding="utf-8").replace(
            "</body>", '<script>document.body.setAttribute("data-height", '
                       'document.documentElement.scrollHeight)</script></body>', 1), encoding="utf-8")
        # a low window: scrollHeight is never less than the viewport, so the page must overflow it
        proc = _chromium(chromium, f"--window-size={width},100", "--dump-dom", probe.as_uri())
    found = re.search(r'data-height="(\d+)"', proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"chromium could not measure {page} (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return int(found.group(1))


def screenshot(page: Path, out: Path, chromium: str, width: int = 1280, height: int | None = None) -> int:
    """Write ``page`` to ``out`` (PNG), the whole page unless ``height`` cuts it; returns the height."""
    out.parent.mkdir(parents=True, exist_ok=True)
    height = height or page_height(page, chromium, width)
    proc = _chromium(chromium, f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri())
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium exited {proc.returncode} without writing {out}: {proc.stderr[-1500:]}")
    return height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a q4k report.html to PNG with headless Chromium.")
    parser.add_argument("report", type=Path, help="a report.html")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=None, help="cut the picture at this many pixels "
                        "(default: the whole page)")
    parser.add_argument("--chromium", default=None, help="the browser binary (default: found on PATH)")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"q4k screenshot: {args.report}: no such file", file=sys.stderr)
        return 2
    chromium = args.chromium or find_chromium()
    if chromium is None:
        print(f"q4k screenshot: no Chromium found on PATH (looked for {', '.join(NAMES)}); "
              "Debian: apt-get install chromium, or pass --chromium", file=sys.stderr)
        return 2
    try:
        height = screenshot(args.report, args.output, chromium, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"q4k screenshot: {exc}", file=sys.stderr)
        return 1
    print(f"q4k screenshot: {args.output} ({args.width} x {height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
