import sys

from benchmarks.peers.cli import entry

sys.exit(entry())
