"""`python -m flows.cli`: the same entry point as the `langpwt` script.
Kept so tests and child processes run the CLI of this checkout with the current interpreter."""
import sys

from flows.cli import main

sys.exit(main())
