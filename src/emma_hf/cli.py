"""The `emma-hf` command."""

import argparse
import sys

import torch

from .configuration_emma import PRESETS, EmmaConfig
from .modeling_emma import EmmaForConditionalGeneration
from .sizes import parameter_report


def params(args: argparse.Namespace) -> None:
    """Build the model on the meta device (no memory, no download) and print its parameter counts."""
    config = EmmaConfig.from_preset(args.preset) if args.model is None else EmmaConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = EmmaForConditionalGeneration(config)
    print(f"EMMA {args.model or args.preset}")
    print(parameter_report(model).table())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emma-hf", description="EMMA: understanding, generation and editing.")
    commands = parser.add_subparsers(dest="command", required=True)
    params_parser = commands.add_parser("params", help="parameter counts of a preset or a checkpoint's config")
    source = params_parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="emma-4b")
    source.add_argument("--model", help="folder or Hub id holding an EMMA config.json")
    params_parser.set_defaults(run=params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
