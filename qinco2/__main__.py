"""``python -m qinco2 task=... key=value ...``: see :mod:`qinco2.cli`."""

import sys

from .cli import main

sys.exit(main())
