"""The seed's batch command: `python3 main.py MODEL DATASET... [options]`.

The same as `deeplsp compare MODEL DATASET...`: one implementation (deeplsp.compare).
"""

import sys

from deeplsp.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
