"""``python -m medsynth`` is the ``medsynth`` command."""

import sys

from .cli import main

sys.exit(main())
