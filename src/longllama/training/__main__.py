"""`torchrun --nproc_per_node N -m longllama.training CONFIG.yaml [--set key=value ...]`: `longllama train`."""

import sys

from longllama.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
