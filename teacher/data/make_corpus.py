"""Regenerate ``stdlib_docstrings.txt``: a small English corpus from CPython's own docstrings.

The text is the docstrings of a fixed list of pure-Python standard-library
modules (module, class and function docstrings, in source order), as shipped
with the interpreter that runs this script. CPython's documentation and
source are under the PSF License Agreement, which permits redistribution;
nothing is downloaded. Deterministic for a given Python version.

    python teacher/data/make_corpus.py            # writes next to this file
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path

# pure-Python modules with plenty of prose; order fixed so the file is reproducible
MODULES = (
    "textwrap", "string", "fractions", "statistics", "calendar", "difflib", "shlex", "heapq",
    "bisect", "queue", "sched", "contextlib", "functools", "dataclasses", "argparse",
    "pathlib", "tempfile", "shutil", "fnmatch", "glob", "json.decoder", "json.encoder",
    "csv", "configparser", "logging", "gettext", "locale", "pprint", "reprlib", "enum",
    "numbers", "random", "secrets", "hmac", "base64", "uuid", "ipaddress", "zipfile",
    "tarfile", "gzip", "email.message", "http.cookies", "urllib.parse", "html.parser",
    "webbrowser", "wave", "colorsys", "copy", "pickle", "weakref", "abc", "typing",
)


def docstrings(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            # short one-liners add little prose; doctest-heavy strings are mostly code
            if doc and len(doc) >= 80 and doc.count(">>>") < 3:
                out.append(inspect.cleandoc(doc))
    return out


# small on purpose: a CPU distillation run over it (teacher vocab 262144) takes minutes
MAX_CHARS = 40_000


def main() -> int:
    texts = [f"Python {sys.version_info.major}.{sys.version_info.minor} standard library docstrings."]
    for name in MODULES:
        for doc in docstrings(name):
            if sum(len(t) for t in texts) + len(doc) > MAX_CHARS:
                break
            texts.append(doc)
    target = Path(__file__).with_name("stdlib_docstrings.txt")
    target.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    print(f"{target}: {sum(len(t) for t in texts)} characters, {len(texts) - 1} docstrings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
