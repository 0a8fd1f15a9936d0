"""The docs stand alone: every link in README.md and docs/*.md resolves to a file in this
repository, and no page points at a path outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# an absolute path to a machine's file system, in a link or in backquotes
OUTSIDE = re.compile(r"`(/(?:work|home|root|opt|tmp)/[^`]*)`|\]\((/[^)]*)\)")


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # an external URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            bad.append(target)
    return bad


def test_every_relative_link_resolves_inside_the_repository() -> None:
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    problems = {p.name: broken_links(p) for p in PAGES}
    assert {k: v for k, v in problems.items() if v} == {}


def test_no_page_points_outside_the_repository() -> None:
    found = {p.name: [m.group(0) for m in OUTSIDE.finditer(p.read_text(encoding="utf-8"))
                      if "/tmp/" not in m.group(0)] for p in PAGES}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "x.md"
    page.write_text("see [design](DESIGN.md) and [web](https://example.org) and [here](#top)\n")
    assert broken_links(page) == ["DESIGN.md"]
