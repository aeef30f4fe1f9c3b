"""`python -m beam_job`: the same command line as `delg-extract` (see beam_job/cli.py)."""

from beam_job.cli import console_main

if __name__ == "__main__":
    console_main()
