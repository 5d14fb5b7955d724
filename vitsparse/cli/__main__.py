"""``python -m vitsparse.cli``: the command line."""

import sys

from vitsparse.cli import main

sys.exit(main())
