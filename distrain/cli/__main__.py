"""``python -m distrain.cli`` — the ``distrain`` command."""

import sys

from distrain.cli.main import main

sys.exit(main())
