import sys

from cscvision.cli import main

sys.exit(main())
