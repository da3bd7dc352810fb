"""`python -m cpmgr` runs the command line."""

from cpmgr.cli import main

raise SystemExit(main())
