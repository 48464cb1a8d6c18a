"""``python -m provcollate``: see :mod:`provcollate.cli`."""
import sys

from .cli import main

sys.exit(main())
