"""Tables and plots from a sweep: `python scripts/report.py multirun/<date>/<time>/ [--baseline fusion=none]`.

Also any list of run folders. Writes report.md, report.csv and PNG plots (see squarefuse/report/).
"""

import sys

from squarefuse.report.app import main

if __name__ == "__main__":
    sys.exit(main())
