"""``python -m detsweep.frontier``: runs `detsweep.frontier.cli.main`."""
import sys

from detsweep.frontier.cli import main

sys.exit(main())
