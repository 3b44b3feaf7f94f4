"""``python -m cmil_core``: see :mod:`cmil_core.cli`."""

from cmil_core.cli import main

raise SystemExit(main())
