"""``python -m equivision ...``: the ``equivision`` command."""

import sys

from .cli.main import main

sys.exit(main())
