"""`python -m loom.train CONFIG [--section.key=value ...]`: the entry point torchrun launches."""

import sys

from loom.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
