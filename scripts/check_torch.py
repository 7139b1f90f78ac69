"""Fail the install if pip replaced the torch build the Makefile installed first.

A dependency that asks for a newer torch (or a torchvision built against one) makes
pip silently download a multi-GB CUDA build; this check turns that into an error.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(pin_file: str) -> int:
    import torch

    expected = Path(pin_file).read_text().strip().removeprefix("torch==")
    if torch.__version__ != expected:
        print(f"pip swapped torch: expected {expected}, found {torch.__version__}", file=sys.stderr)
        return 1
    build = "CUDA " + str(torch.version.cuda) if torch.version.cuda else "CPU"
    print(f"torch {torch.__version__} ({build} build) kept")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
