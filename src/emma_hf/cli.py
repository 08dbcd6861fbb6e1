"""The `emma-hf` command."""

import argparse
import math
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

import torch
from transformers import TextStreamer

from .configuration_emma import PRESETS, EmmaConfig
from .modeling_emma import EmmaForConditionalGeneration
from .processing_emma import EmmaProcessor
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
    from .convert import build_emma_from_components
    from .hub import check_save_directory, export_checkpoint
    from .processing_emma import EmmaImageProcessor

    check_save_directory(args.output, args.overwrite)
    overrides = {}
    if args.num_shallow_layers is not None:
        overrides["num_shallow_layers"] = args.num_shallow_layers
    if args.vision_moe_layers is not None:
        overrides["vision_moe_layers"] = args.vision_moe_layers
    image_processor = EmmaImageProcessor(size={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels})
    model, processor = build_emma_from_components(
        args.llm, args.vision, args.vae, image_processor, dtype=getattr(torch, args.dtype), **overrides
    )
    base_models = [str(source) for source in (args.llm, args.vision, args.vae)]
    export_checkpoint(
        model,
        processor,
        args.output,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        base_model=base_models,
    )
    weights = {tensor.data_ptr(): tensor.nbytes for tensor in model.state_dict().values()}  # tied ones once
    weight_bytes = sum(weights.values())
    peak = peak_memory_bytes()
    memory = (
        "" if peak is None else f"; peak memory (RSS) {peak / 2**30:.2f} GiB, {peak / weight_bytes:.2f}x the weights"
    )
    print(
        f"EMMA checkpoint written to {args.output}: {weight_bytes / 2**30:.2f} GiB of weights ({args.dtype}){memory}"
    )


def peak_memory_bytes() -> int | None:
    """The process's peak resident memory, where the platform reports it (not on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def train(args: argparse.Namespace) -> None:
    """Run a training recipe (stage, data, model, LoRA, output) from a YAML config."""
    from .training import TrainConfig, run_training

    config = TrainConfig.from_yaml(args.config)
    run_training(config)
    print(f"wrote {os.path.join(config.output_dir, 'final')} (checkpoints in {config.output_dir})")


def load_pipeline(args: argparse.Namespace):
    """The pipeline of `--model` (folder or Hub id), or of the shapes model shipped in the package, with `--lora`."""
    from .pipeline_emma import EmmaPipeline
    from .shipped import shipped_model_path

    if args.model and os.path.isfile(os.path.join(args.model, "adapter_config.json")):
        raise ValueError(f"{args.model!r} holds a LoRA adapter, not a model: pass it as --lora (and --model its base)")
    pipe = EmmaPipeline.from_pretrained(str(args.model or shipped_model_path()), dtype=torch.float32)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.model.eval()
    return pipe


def generation_settings(args: argparse.Namespace) -> dict:
    """The sampler options given; the pipeline takes the checkpoint's settings for the others."""
    return {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "generator": torch.Generator().manual_seed(args.seed),
    }


def require_known_words(processor: EmmaProcessor, text: str) -> None:
    """Stop before any work when `text` uses words a closed-vocabulary model (the shipped one) never learnt."""
    unknown = processor.unknown_words(text)
    if unknown:
        raise ValueError(f"{processor.unknown_words_message(unknown)}. Rephrase with those words.")


def generate(args: argparse.Namespace) -> None:
    """Draw PROMPT into FILE."""
    pipe = load_pipeline(args)
    require_known_words(pipe.processor, args.prompt)
    image = pipe(args.prompt, height=args.height, width=args.width, **generation_settings(args)).images[0]
    image.save(args.output)
    print(f"wrote {args.output}")


def edit(args: argparse.Namespace) -> None:
    """Apply INSTRUCTION to IMAGE, into FILE."""
    pipe = load_pipeline(args)
    require_known_words(pipe.processor, args.instruction)
    settings = generation_settings(args)
    image = pipe(args.instruction, image=args.image, image_guidance_scale=args.image_guidance, **settings).images[0]
    image.save(args.output)
    print(f"wrote {args.output}")


class AnswerStreamer(TextStreamer):
    """Prints the answer as it is written, and a line end only after an answer: an empty one leaves stdout empty."""

    wrote_text = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.wrote_text = self.wrote_text or bool(text)
        if text or (stream_end and self.wrote_text):
            super().on_finalized_text(text, stream_end=stream_end)


def chat(args: argparse.Namespace) -> None:
    """Answer QUESTION about --image, streaming the answer."""
    pipe = load_pipeline(args)
    require_known_words(pipe.processor, args.question)
    if not args.image:
        print("emma-hf chat: no --image given; the model answers from the question alone", file=sys.stderr)
    content = [{"type": "image", "image": args.image}] if args.image else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": args.question}]}]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    streamer = AnswerStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = pipe.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    answer = pipe.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if not answer.strip():
        examples = "" if args.model else " (the shipped model answers e.g. 'how many circles are there?')"
        raise ValueError(f"the model ended its turn without an answer to {args.question!r}; rephrase it{examples}")


def evaluate_shapes(args: argparse.Namespace) -> None:
    """The shapes-world scores (docs/shapes.md) on scenes drawn with --seed, as a table (and JSON with --json)."""
    from tqdm.auto import tqdm

    from .shapes import evaluate, score_table

    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    scores = evaluate(
        pipe,
        seed=args.seed,
        num_questions=args.questions,
        num_prompts=args.prompts,
        num_edits=args.edits,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        image_guidance_scale=args.image_guidance,
        progress=tqdm,
    )
    table = score_table(scores)
    print(table)
    if args.json:
        import json

        rows = {task: {kind: rate for kind, rate, _ in task_scores.rows()} for task, task_scores in scores.items()}
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
        print(f"wrote {args.json}")


def demo(args: argparse.Namespace) -> None:
    """A contact sheet: prompts and their images, edits before and after, questions with answers."""
    from .shapes.demo import contact_sheet

    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    contact_sheet(pipe, **generation_settings(args), image_guidance_scale=args.image_guidance).save(args.output)
    print(f"wrote {args.output}")


# Argument types: bad values stop at parsing, with a message naming what is allowed, before any model loads.


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    if not text.strip().isdigit() or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return int(text)


def image_side(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1 or int(text) % 32:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 32 (one token per 32x32 pixels), got {text!r}"
        )
    return int(text)


def guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (<= 1 turns guidance off), got {text!r}")
    return value


def adapter_source(text: str) -> str:
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "adapter_config.json")):
            raise argparse.ArgumentTypeError(f"{text!r} holds no adapter_config.json: not a PEFT adapter folder")
        return text
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith("."):
        raise argparse.ArgumentTypeError(
            f"no folder {text!r}; pass a PEFT adapter folder or Hub id ('namespace/name')"
        )
    return text


def model_source(text: str) -> str:
    if os.path.isdir(text) or re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        return text
    raise argparse.ArgumentTypeError(f"no folder {text!r} here; pass an EMMA folder or a Hub id ('namespace/name')")


def existing_image_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"image file not found: {text!r}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file (a folder, FIFO or device)")
    return text


def image_output_file(text: str) -> str:
    import PIL.Image

    extension = os.path.splitext(text)[1].lower()
    if PIL.Image.registered_extensions().get(extension) not in PIL.Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"{text!r} needs an image extension PIL can write, such as .png, .jpg or .webp"
        )
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist: {folder!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name the image file to write")
    return text


# Sampler options left out take the checkpoint's settings (`EmmaConfig.image_sampler_defaults`).
CHECKPOINT_DEFAULT = "(default: the checkpoint's; {} for the shipped model)"
IMAGE_GUIDANCE_HELP = f"source-image guidance scale of edits (<= 1: off) {CHECKPOINT_DEFAULT.format(1.5)}"


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.option_strings and not any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            help_text += " (default: %(default)s)"
        return help_text


def add_model_options(parser: argparse.ArgumentParser, drawing: bool = True) -> None:
    parser.add_argument(
        "--model", type=model_source, help="EMMA folder or Hub id (default: the shapes model shipped with emma_hf)"
    )
    parser.add_argument("--lora", type=adapter_source, help="PEFT LoRA adapter folder or Hub id to apply to the model")
    if drawing:
        parser.add_argument("--seed", type=seed, default=0, help="seed of the initial noise")
        parser.add_argument("--steps", type=positive_int, help=f"denoising steps {CHECKPOINT_DEFAULT.format(20)}")
        parser.add_argument(
            "--guidance", type=guidance_scale, help=f"text guidance scale (<= 1: off) {CHECKPOINT_DEFAULT.format(3.0)}"
        )


def package_version() -> str:
    try:
        return version("emma_hf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emma-hf", description="EMMA: understanding, generation and editing.", formatter_class=HelpWithDefaults
    )
    parser.add_argument("--version", action="version", version=f"emma-hf {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpWithDefaults)

    params_parser = add_command("params", "parameter counts of a preset or a checkpoint's config")
    source = params_parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="emma-4b", help="model size to count")
    source.add_argument("--model", help="folder or Hub id holding an EMMA config.json")
    params_parser.set_defaults(run=params)

    convert_parser = add_command("convert", "build EMMA from Qwen3, SigLIP2 and DC-AE checkpoints")
    convert_parser.add_argument("--llm", required=True, help="Qwen3 causal-LM folder or Hub id (with its tokenizer)")
    convert_parser.add_argument("--vision", required=True, help="SigLIP2 vision or full model folder or Hub id")
    convert_parser.add_argument("--vae", required=True, help="diffusers AutoencoderDC folder or Hub id")
    convert_parser.add_argument("--output", required=True, help="folder to write the exported checkpoint to")
    convert_parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder that holds no EMMA export"
    )
    convert_parser.add_argument("--num-shallow-layers", type=int, help="decoder layers sharing all but v_proj")
    convert_parser.add_argument("--vision-moe-layers", type=int, nargs="+", help="SigLIP2 layers given MoE MLPs")
    convert_parser.add_argument("--min-pixels", type=int, default=256 * 256, help="image processor's pixel floor")
    convert_parser.add_argument("--max-pixels", type=int, default=1024 * 1024, help="image processor's pixel budget")
    convert_parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype the model is built and written in",
    )
    convert_parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    convert_parser.set_defaults(run=convert)

    train_parser = add_command("train", "train a stage (or LoRA) from a YAML config")
    train_parser.add_argument("config", help="YAML file: model, stage, output_dir, data, training, ... (see docs)")
    train_parser.set_defaults(run=train)

    generate_parser = add_command("generate", "draw an image from a prompt")
    generate_parser.add_argument("prompt", help="what to draw")
    generate_parser.add_argument("-o", "--output", type=image_output_file, required=True, help="image file to write")
    size_help = "image {} in pixels, a multiple of 32 (default: the model's own size, 96 for the shipped model)"
    generate_parser.add_argument("--height", type=image_side, help=size_help.format("height"))
    generate_parser.add_argument("--width", type=image_side, help=size_help.format("width"))
    add_model_options(generate_parser)
    generate_parser.set_defaults(run=generate)

    edit_parser = add_command("edit", "edit an image by an instruction")
    edit_parser.add_argument("image", type=existing_image_file, help="image file to edit")
    edit_parser.add_argument("instruction", help="what to change")
    edit_parser.add_argument("-o", "--output", type=image_output_file, required=True, help="image file to write")
    edit_parser.add_argument("--image-guidance", type=guidance_scale, help=IMAGE_GUIDANCE_HELP)
    add_model_options(edit_parser)
    edit_parser.set_defaults(run=edit)

    chat_parser = add_command("chat", "answer a question about an image")
    chat_parser.add_argument("question", help="the question")
    chat_parser.add_argument("--image", type=existing_image_file, help="image file the question is about")
    chat_parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer, in tokens")
    add_model_options(chat_parser, drawing=False)
    chat_parser.set_defaults(run=chat)

    eval_parser = add_command("eval", "the shapes-world scores (docs/shapes.md) as a table")
    eval_parser.add_argument("--questions", type=positive_int, default=500, help="questions to answer (understanding)")
    eval_parser.add_argument("--prompts", type=positive_int, default=200, help="prompts to draw (text-to-image)")
    eval_parser.add_argument("--edits", type=positive_int, default=200, help="instructions to apply (editing)")
    eval_parser.add_argument("--image-guidance", type=guidance_scale, help=IMAGE_GUIDANCE_HELP)
    eval_parser.add_argument("--json", help="also write the scores to this JSON file")
    add_model_options(eval_parser)
    eval_parser.set_defaults(run=evaluate_shapes, seed=1234)

    demo_parser = add_command("demo", "write a contact sheet of all three tasks")
    demo_parser.add_argument(
        "-o", "--output", type=image_output_file, default="emma-demo.png", help="image file to write"
    )
    demo_parser.add_argument("--image-guidance", type=guidance_scale, help=IMAGE_GUIDANCE_HELP)
    add_model_options(demo_parser)
    demo_parser.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends it with a one-line message (exit 2 for arguments, 1 for the rest)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as error:
        parser.exit(1, f"emma-hf {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
