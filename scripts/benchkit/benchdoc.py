"""Write one benchmark's section into docs/benchmarks.md, leaving the other sections alone.

Each benchmark script owns the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`;
running it again replaces just that text, so figures from different scripts (and
machines) live side by side in one page. PINGU_BENCHMARKS_DOC names another file to
write instead (the tests run every script small and must not touch the real figures).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Figures written by the scripts in `scripts/`; each section names the machine and the
command that produced it. Re-run a script to refresh its section. Tests never time things.
"""


def machine() -> str:
    """A one-line description of this machine: CPU model, cores, memory, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python {python}"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, body: str) -> Path:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`."""
    doc = Path(os.environ.get("PINGU_BENCHMARKS_DOC") or DOC)
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    marker = re.escape(name)
    pattern = re.compile(rf"<!-- {marker}:start -->.*?<!-- {marker}:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    doc.write_text(text)
    return doc
