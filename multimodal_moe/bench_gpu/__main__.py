"""``python -m multimodal_moe.bench_gpu``: the same as ``mmoe bench gpu``."""

import sys

from .run import main

sys.exit(main())
