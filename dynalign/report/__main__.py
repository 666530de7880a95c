"""``python -m dynalign.report RUNS_DIR``: see :mod:`dynalign.report`."""

from dynalign.report import main

raise SystemExit(main())
