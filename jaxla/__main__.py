"""``python -m jaxla``: the same as the ``jaxla`` console script."""

import sys

from jaxla.cli import main

sys.exit(main())
