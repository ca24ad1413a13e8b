"""``python -m cli …``: the same as ``lafam-serve …``."""

import sys

from cli.main import main

sys.exit(main())
