"""`python -m qkv ...` (and `torchrun -m qkv train ...`): the same as the `qkv` command."""

import sys

from .cli import main

sys.exit(main())
