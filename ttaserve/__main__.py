import sys

from ttaserve.cli import main

sys.exit(main())
