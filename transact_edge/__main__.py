import sys

from transact_edge.cli import main

sys.exit(main())
