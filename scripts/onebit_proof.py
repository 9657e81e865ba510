"""OneBit proof run: compress SmolLM2-135M to ~1 bit per weight and write the comparison table.

Same options as ``lowbit compress onebit`` (see ``lowbit.onebit.compress``); writes OUT/results.json,
OUT/table.md, OUT/ppl_vs_tokens.png, OUT/model/ (the packed checkpoint) and OUT/synthetic.safetensors.

GPU (the documented proof, about 7 minutes on one H100; docs/onebit.md says how to get the model there):
    python scripts/onebit_proof.py --out runs/onebit --time-budget-min 5
CPU smoke test (a couple of minutes; numbers meaningless):
    python scripts/onebit_proof.py --out /tmp/onebit_smoke --device cpu --synthetic 8 --synthetic-len 32 \
        --steps 2 --time-budget-min 0 --batch-size 4 --seq-len 32 --real-tokens 5000 --eval-tokens 600 \
        --eval-seq-len 128 --eval-points 1
"""

import argparse
import sys

from lowbit.onebit.compress import add_arguments, config_from_args, run_compress


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    run_compress(config_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
