"""``python -m ddetr.export --model SRC --output model.onnx``: see ``ddetr.export.cli``."""

import sys

from ddetr.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
