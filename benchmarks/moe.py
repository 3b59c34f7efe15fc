"""Speed and memory of the FFN family at equal active FLOPs; prints JSON.

    python benchmarks/moe.py [--rounds 7] [--no-memory] [--no-hf]     (same as `mmoe bench moe`)

See multimodal_moe/bench.py for what is measured and how.
"""

import sys

from multimodal_moe.bench import main

if __name__ == "__main__":
    sys.exit(main())
