"""``python -m contlearn`` runs the command line."""

import sys

try:
    from contlearn.cli import entry
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    sys.stderr.write("contlearn: interrupted\n")
    sys.exit(130)

entry()
