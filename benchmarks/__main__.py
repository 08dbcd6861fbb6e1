"""
python -m benchmarks [--size mid|smoke] [--rows 1 3 ...] [--json FILE]: print the table, optionally write JSON.
python -m benchmarks --size real --checkpoint FOLDER [--quantization Q] [--steps ...]: EMMA-4B at its real size
(benchmarks/real_size.py: about 13 GiB of weights, minutes per step on a CPU; run by hand, never in CI).
"""

import argparse
import sys
from pathlib import Path

import torch

from .harness import machine_description, markdown_table, write_json
from .real_size import LOADS, QUANTIZATIONS, STEPS, TRAINING_STEPS, run_steps
from .rows import all_rows
from .setups import SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--size",
        choices=[*sorted(SIZES), "real"],
        default="mid",
        help="mid: the table; smoke: CI's check; real: EMMA-4B (needs --checkpoint)",
    )
    parser.add_argument("--checkpoint", help="--size real: an exported emma-4b folder (`emma-hf convert`)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="bf16", help="--size real: how to load")
    parser.add_argument("--steps", nargs="+", choices=[*LOADS, *STEPS, *TRAINING_STEPS], help="--size real: steps")
    parser.add_argument("--rows", nargs="+", choices=[str(n) for n in range(1, 11)], help="only these rows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.size == "real":
        if not args.checkpoint or not Path(args.checkpoint, "config.json").is_file():
            parser.error("--size real needs --checkpoint FOLDER, an exported emma-4b (see benchmarks/real_size.py)")
        print(f"Machine: {machine_description()}; size: real ({args.quantization})")
        run_steps(args.checkpoint, args.steps or [*LOADS, *STEPS], args.quantization)
        return 0
    sizes = SIZES[args.size]
    rows = all_rows(sizes, set(args.rows) if args.rows else None)
    print(f"Machine: {machine_description()}; size: {sizes.name}\n")
    print(markdown_table(rows))
    if args.json:
        write_json(rows, args.json, {"size": sizes.name, "rows": args.rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
