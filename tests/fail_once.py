"""``python -m metabp`` whose rank 1 dies at iteration $METABP_TEST_FAIL_AT of torchrun's first attempt.

For tests/test_distributed.py: ``torchrun --max-restarts 1 tests/fail_once.py train ...``.
"""

import os
import sys

from metabp import families
from metabp.cli import main

if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
    fail_at = int(os.environ["METABP_TEST_FAIL_AT"])
    real = families._sinusoid_loop

    def patched(model, optimizer, generator, config, group):
        (sample, step), calls = real(model, optimizer, generator, config, group), {"n": 0}

        def failing(batch):
            calls["n"] += 1
            if calls["n"] == fail_at and group.rank == 1:
                os._exit(3)  # a crash: no message, no cleanup
            return step(batch)

        return sample, failing

    families._sinusoid_loop = patched

sys.exit(main(sys.argv[1:]))
