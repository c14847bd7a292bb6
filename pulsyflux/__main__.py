"""``python -m pulsyflux``: the same as the ``pulsyflux`` command."""

import sys

from .cli.program import main

sys.exit(main())
