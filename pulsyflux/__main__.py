"""``python -m pulsyflux``: the same as the ``pulsyflux`` command."""

import sys

from .cli import main

sys.exit(main())
