import sys

from p2pull.cli import main

sys.exit(main())
