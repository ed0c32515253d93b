"""``python -m ddetr.annotate INPUT... --output DIR``: see ``ddetr.annotate.cli``."""

import sys

from ddetr.annotate.cli import main

if __name__ == "__main__":
    sys.exit(main())
