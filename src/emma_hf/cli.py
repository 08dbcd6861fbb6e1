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


def convert(args: argparse.Namespace) -> None:
    """Build EMMA from Qwen3 + SigLIP2 + DC-AE checkpoints and write it as an exported checkpoint."""
    from .convert import build_emma_from_components, export_checkpoint
    from .processing_emma import EmmaImageProcessor

    overrides = {}
    if args.num_shallow_layers is not None:
        overrides["num_shallow_layers"] = args.num_shallow_layers
    if args.vision_moe_layers is not None:
        overrides["vision_moe_layers"] = args.vision_moe_layers
    image_processor = EmmaImageProcessor(size={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels})
    model, processor = build_emma_from_components(args.llm, args.vision, args.vae, image_processor, **overrides)
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    base_models = [str(source) for source in (args.llm, args.vision, args.vae)]
    export_checkpoint(model, processor, args.output, max_shard_size=args.max_shard_size, base_model=base_models)
    print(f"EMMA checkpoint written to {args.output}")


def train(args: argparse.Namespace) -> None:
    """Run a training recipe (stage, data, model, LoRA, output) from a YAML config."""
    from .training import TrainConfig, run_training

    run_training(TrainConfig.from_yaml(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emma-hf", description="EMMA: understanding, generation and editing.")
    commands = parser.add_subparsers(dest="command", required=True)
    params_parser = commands.add_parser("params", help="parameter counts of a preset or a checkpoint's config")
    source = params_parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="emma-4b")
    source.add_argument("--model", help="folder or Hub id holding an EMMA config.json")
    params_parser.set_defaults(run=params)

    convert_parser = commands.add_parser("convert", help="build EMMA from Qwen3, SigLIP2 and DC-AE checkpoints")
    convert_parser.add_argument("--llm", required=True, help="Qwen3 causal-LM folder or Hub id (with its tokenizer)")
    convert_parser.add_argument("--vision", required=True, help="SigLIP2 vision or full model folder or Hub id")
    convert_parser.add_argument("--vae", required=True, help="diffusers AutoencoderDC folder or Hub id")
    convert_parser.add_argument("--output", required=True, help="folder to write the exported checkpoint to")
    convert_parser.add_argument("--num-shallow-layers", type=int, help="decoder layers sharing all but v_proj")
    convert_parser.add_argument("--vision-moe-layers", type=int, nargs="+", help="SigLIP2 layers given MoE MLPs")
    convert_parser.add_argument("--min-pixels", type=int, default=256 * 256, help="image processor's pixel floor")
    convert_parser.add_argument("--max-pixels", type=int, default=1024 * 1024, help="image processor's pixel budget")
    convert_parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    convert_parser.add_argument("--max-shard-size", default="5GB")
    convert_parser.set_defaults(run=convert)

    train_parser = commands.add_parser("train", help="train a stage (or LoRA) from a YAML config")
    train_parser.add_argument("config", help="YAML file: model, stage, output_dir, data, training, ... (see docs)")
    train_parser.set_defaults(run=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
