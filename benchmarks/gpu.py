"""The one-command acceptance run on a GPU; prints JSON.

    python benchmarks/gpu.py [--out gpu.json] [--quick] [--sections presets,grouped_mm,...]   (same as `mmoe bench gpu`)

See multimodal_moe/bench_gpu/ for what is checked and measured.
"""

import sys

from multimodal_moe.bench_gpu import main

if __name__ == "__main__":
    sys.exit(main())
