"""``python -m novita_async`` runs the ``novita-async`` command line."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
