import sys

from ._cli import entry

sys.exit(entry())
