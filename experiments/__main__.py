"""`python -m experiments ...`: the command line of `experiments.harness.cli` (see --help)."""
import sys

from experiments.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
