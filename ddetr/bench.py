"""``python -m ddetr.bench``: the side-by-side benchmark against transformers, run from a source checkout.

The benchmark itself lives in the repository's top-level ``benchmarks`` package: it imports transformers, which
the ddetr package never does. This module only forwards to it, so both ``python -m ddetr.bench`` and
``python -m benchmarks`` work (same arguments; ``--help`` lists them).
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        benchmark = importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", "benchmarks.__main__"):
            raise
        print(
            "python -m ddetr.bench needs the benchmarks/ folder of a ddetr source checkout: "
            "run it from the repository root.",
            file=sys.stderr,
        )
        return 2
    return benchmark.main(argv)


if __name__ == "__main__":
    sys.exit(main())
