"""``python -m prefkernels`` runs the command line (see ``prefkernels.cli``)."""
import sys

from prefkernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
