"""python -m fastlddmm ...: the same command line as the ``fastlddmm`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
