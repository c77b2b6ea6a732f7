"""`python -m sid.index --config configs/index/<preset>.yaml [--flags]`: build semantic IDs for a dataset."""

from __future__ import annotations

import logging
import sys

from sid.config import run_cli
from sid.index.build import run_index
from sid.jobs import IndexJob


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(IndexJob, run_index, argv)


if __name__ == "__main__":
    sys.exit(main())
