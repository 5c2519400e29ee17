"""``python -m conversion SOURCE --name ENGINE ...``: same as ``fastpilot convert``."""

import sys

from .cli import main

sys.exit(main())
