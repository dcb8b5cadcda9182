"""`python -m megatron_m2po COMMAND ...` is the `m2po` console script: `torchrun ... -m megatron_m2po train ...`.

This module stays light on purpose: spawned helper processes (the reward pool's workers, the checkpoint
writer) re-import the main module, and the guard below keeps them from running the command again.
"""

import sys

from megatron_m2po.commands.m2po import main

if __name__ == "__main__":
    sys.exit(main())
