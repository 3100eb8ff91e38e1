"""``python -m slimtune.cli``: the same as the ``slimtune`` console script."""

import sys

from .main import main

sys.exit(main())
