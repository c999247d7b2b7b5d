"""``python -m xcompile``."""

import sys

from xcompile.cli import main

sys.exit(main())
