"""`python -m beam_job`: the same command line as `delg-extract` (see beam_job/cli.py)."""

import sys

if __name__ == "__main__":
    if "--version" in sys.argv[1:]:  # answered before beam_job.cli imports Beam (about 1.5 s)
        from beam_job import __version__

        print(__version__)
        sys.exit(0)
    from beam_job.cli import console_main

    console_main()
