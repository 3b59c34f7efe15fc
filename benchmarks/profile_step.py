"""Where a trainer step's time goes, as JSON (see multimodal_moe/bench_gpu/profile.py).

    python benchmarks/profile_step.py --presets beit3/base,beit3/base_xmoe_8e --batches 32,128
    python benchmarks/profile_step.py --device cpu --presets beit3/debug --batches 4   # a smoke run
"""

import sys

from multimodal_moe.bench_gpu.profile import main

if __name__ == "__main__":
    sys.exit(main())
