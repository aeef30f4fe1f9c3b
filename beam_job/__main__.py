"""`python -m beam_job`: the same command line as `delg-extract` (see beam_job/cli.py)."""

import sys

from beam_job.cli import main

if __name__ == "__main__":
    sys.exit(main())
