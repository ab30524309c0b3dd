"""``python -m commentaries_ext`` is the ``commentaries`` command."""
import sys

from .cli import main

sys.exit(main())
