import sys

from deeplsp.cli import main

sys.exit(main())
