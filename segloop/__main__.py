"""``python -m segloop`` = the ``segloop`` command."""

import sys

from segloop.cli import main

sys.exit(main())
