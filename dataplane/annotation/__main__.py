"""``python -m dataplane.annotation`` = ``segloop queue``."""

from dataplane.annotation.cli import main

raise SystemExit(main())
