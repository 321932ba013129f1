"""`python -m loom.finetune CONFIG [--section.key=value ...]`: the entry point torchrun launches."""

import sys

from loom.cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
