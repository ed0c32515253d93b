"""``python -m finetune.evaluate``: see ``finetune.evaluate.cli``."""

import sys

from finetune.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
