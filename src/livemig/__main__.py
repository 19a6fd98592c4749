"""``python -m livemig`` runs the command line."""

import sys

from livemig.cli import main

sys.exit(main())
