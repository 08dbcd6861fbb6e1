"""python -m benchmarks [--size mid|smoke] [--rows 1 3 ...] [--json FILE]: print the table, optionally write JSON."""

import argparse
import sys

import torch

from .harness import machine_description, markdown_table, write_json
from .rows import all_rows
from .setups import SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid", help="mid: the table; smoke: CI's check")
    parser.add_argument("--rows", nargs="+", choices=[str(n) for n in range(1, 10)], help="only these rows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = SIZES[args.size]
    rows = all_rows(sizes, set(args.rows) if args.rows else None)
    print(f"Machine: {machine_description()}; size: {sizes.name}\n")
    print(markdown_table(rows))
    if args.json:
        write_json(rows, args.json, {"size": sizes.name, "rows": args.rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
