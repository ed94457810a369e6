"""``python -m contlearn`` runs the command line."""

import sys

from contlearn.cli import main

sys.exit(main())
