"""
The shapes model's recipe. `run` makes every step of a recipe file whose output is missing, so it can be stopped and
started again (docs/shapes.md gives the times):

    python -m emma_hf.shapes.recipe run examples/shapes/recipe.yaml   # DC-AE, data, init, stages 0-3, sampler
    python -m emma_hf.shapes.recipe ship examples/shapes/recipe.yaml  # bf16 copy into the package

The steps one by one:

    python -m emma_hf.shapes.recipe autoencoder runs/shapes/autoencoder    # the small DC-AE
    python -m emma_hf.shapes.recipe data runs/shapes/data                  # training JSONL + PNGs (seed 0)
    python -m emma_hf.shapes.recipe init runs/shapes/init --autoencoder runs/shapes/autoencoder/final
    emma-hf train examples/shapes/stage0-align.yaml                        # ... then stage1, 2, 3
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderDC

from ..configuration_emma import EmmaConfig
from ..hub import export_checkpoint
from ..modeling_emma import EmmaForConditionalGeneration
from ..processing_emma import EmmaImageProcessor, EmmaProcessor
from ..training import TrainConfig, run_training
from .autoencoder import reconstruction_pass_rate, train_autoencoder
from .data import corpus, edit_set, prompt_set, vocabulary, write_training_data
from .evaluate import score_edits, score_prompts
from .tokenizer import train_bpe_tokenizer
from .world import EDIT_TYPES, PROMPT_CATEGORIES


CANVAS = 96
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "shipped" / "shapes-emma"
# The shipped model's card (docs/shapes.md has the measurements).
SHIPPED_CARD = {
    "intended_use": (
        "A demonstration and test model for the synthetic shapes world of emma_hf (coloured circles, squares and "
        "triangles on a 3x3 grid, 96x96 pixels): it runs offline on a CPU, so the CLI, the notebooks and the tests "
        "can chat, draw and edit with a trained EMMA. It knows nothing of natural images; it is not a base for "
        "real-world use, only for trying the API and for fine-tuning experiments in the same world."
    ),
    "training": (
        "Built from scratch by `python -m emma_hf.shapes.recipe run examples/shapes/recipe.yaml` (docs/shapes.md in "
        "the emma_hf repository): a small DC-AE (5000 steps), then EMMA's stages 0 (align, 150 steps), 1 (pretrain, "
        "900), 2 (SFT, 16000) and 3 (quality, 150) on 12000 questions, 12000 prompts and 12000 edits drawn with seed "
        "0, with condition dropout so that classifier-free guidance is trained; stage 4 (MoE) was skipped. No prompt "
        "or edit target holds a purple triangle, which is kept for a held-out test. About 2 hours on 2 CPU cores "
        "(bf16 autocast); weights stored in bfloat16. Sampler settings chosen on scenes of seed 777: 20 steps, text "
        "guidance 3, image guidance 1.5."
    ),
    "limitations": (
        "Scores of `emma-hf eval` (scenes of seed 1234, never trained on; the sampler settings above): understanding "
        "0.980, text-to-image 0.775, editing 0.725 against targets of 0.95 / 0.85 / 0.75. Prompts about relations "
        "between two objects pass only 0.33 of the time; held-out purple triangles are drawn 0.50 and edited 0.26 of "
        "the time. The small DC-AE caps image fidelity."
    ),
    "example_question": "describe the image.",
    "example_prompt": "a red circle at the top left",
    "example_edit": "make the red circle green",
}
TEXT_CONFIG = {
    "model_type": "qwen3",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
VISION_CONFIG = {
    "model_type": "siglip2_vision_model",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "patch_size": 16,
    "num_patches": (CANVAS // 16) ** 2,
    "vision_use_head": False,
}
# A 96-px canvas is a 3x3 token grid; spreading its cells 8 apart triples the distance between their sin-cos
# embeddings, without which context-image positions were learnt too slowly for `where` questions and edits.
IMAGE_POSITION_SCALE = 8.0
SAMPLER_KEYS = ("output", "seed", "prompts", "edits", "num_inference_steps", "guidance_scale", "image_guidance_scale")
# Defaults of the single steps; examples/shapes/recipe.yaml holds the shipped model's values.
AUTOENCODER_STEPS = 5000
NUM_QUESTIONS, NUM_PROMPTS, NUM_EDITS = 12000, 12000, 12000


def initial_model(autoencoder_path: str | Path, seed: int = 0) -> tuple[EmmaForConditionalGeneration, EmmaProcessor]:
    """A randomly initialised shapes EMMA around the trained DC-AE, with the world's tokenizer."""
    tokenizer = train_bpe_tokenizer(corpus(seed), vocab_size=400, lowercase=True)
    processor = EmmaProcessor(
        EmmaImageProcessor(size={"height": CANVAS, "width": CANVAS}), tokenizer, known_words=vocabulary(seed)
    )
    autoencoder = AutoencoderDC.from_pretrained(autoencoder_path)
    vae_config = {key: value for key, value in autoencoder.config.items() if not key.startswith("_")}
    torch.manual_seed(seed)
    config = EmmaConfig(
        text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer)},
        vision_config=VISION_CONFIG,
        vae_config=vae_config,
        vision_moe_layers=[3],
        image_position_scale=IMAGE_POSITION_SCALE,
        **processor.emma_token_ids,
    )
    model = EmmaForConditionalGeneration(config)
    model.model.vae.load_state_dict(autoencoder.state_dict())
    model.model.initialize_gen_stream_from_und()
    model.model.initialize_experts_from_versatile()
    with torch.no_grad():
        model.velocity_head.linear_2.weight.zero_()
        model.velocity_head.linear_2.bias.zero_()
    return model, processor


def ship(recipe_file: str | Path, destination: Path = SHIPPED_MODEL) -> Path:
    """
    Copy a recipe's trained checkpoint into the package with the sampler settings the recipe chose, every weight in
    bf16 to fit the package's size budget, without remote code: the installed package loads it, and exports of it
    carry the code of the day.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    recipe = Recipe.from_yaml(recipe_file)
    checkpoint = os.path.join(recipe.stage_outputs()[-1], "final")
    sampler = Path(recipe.sampler["output"])
    if not is_done(checkpoint) or not sampler.is_file():
        raise FileNotFoundError(f"{recipe_file}: the recipe has not finished ({checkpoint}, {sampler}); run it first")
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = model.to(torch.bfloat16)
    model.config.image_sampler_defaults = json.loads(sampler.read_text())["image_sampler_defaults"]
    export_checkpoint(
        model,
        processor,
        destination,
        remote_code=False,
        model_name="shapes-emma",
        license="apache-2.0",
        **SHIPPED_CARD,
    )
    return destination


@dataclass
class Recipe:
    """A recipe file (examples/shapes/recipe.yaml); its paths are relative to the file, like `emma-hf train`'s."""

    autoencoder: dict
    data: dict
    init: str
    stages: list[str]
    sampler: dict

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {str(path)!r}")
        raw = yaml.safe_load(path.read_text())
        expected = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != expected:
            raise ValueError(f"{path}: a recipe maps exactly {sorted(expected)}; got {raw!r}")
        if set(raw["autoencoder"]) != {"output", "steps"}:
            raise ValueError(f"{path}: autoencoder needs output and steps, got {raw['autoencoder']!r}")
        if set(raw["data"]) != {"output", "seed", "questions", "prompts", "edits"}:
            raise ValueError(f"{path}: data needs output, seed, questions, prompts and edits, got {raw['data']!r}")
        if set(raw["sampler"]) != set(SAMPLER_KEYS):
            raise ValueError(f"{path}: sampler needs {list(SAMPLER_KEYS)}, got {raw['sampler']!r}")
        base = path.parent
        recipe = cls(**raw)
        recipe.autoencoder = {**recipe.autoencoder, "output": os.path.normpath(base / recipe.autoencoder["output"])}
        recipe.data = {**recipe.data, "output": os.path.normpath(base / recipe.data["output"])}
        recipe.init = os.path.normpath(base / recipe.init)
        recipe.sampler = {**recipe.sampler, "output": os.path.normpath(base / recipe.sampler["output"])}
        recipe.stages = [os.path.normpath(base / stage) for stage in recipe.stages]
        return recipe

    def stage_outputs(self) -> list[str]:
        """Each stage's `output_dir`, checked to start from the output of the step before."""
        outputs, previous = [], self.init
        for stage in self.stages:
            raw = yaml.safe_load(Path(stage).read_text())
            model = os.path.normpath(Path(stage).parent / raw["model"])
            if model != previous:
                raise ValueError(f"{stage}: model must be {previous!r}, the previous step's output; got {model!r}")
            outputs.append(os.path.normpath(Path(stage).parent / raw["output_dir"]))
            previous = os.path.join(outputs[-1], "final")
        return outputs


def is_done(checkpoint: str | Path) -> bool:
    """An exported checkpoint is complete once its model card, written last, exists."""
    return (Path(checkpoint) / "README.md").is_file()


def run_recipe(path: str | Path) -> str:
    """
    Every step of the recipe file that has not finished, in order; a training step stopped part-way resumes from its
    last checkpoint. Returns the last stage's checkpoint.
    """
    recipe = Recipe.from_yaml(path)
    outputs = recipe.stage_outputs()
    autoencoder = os.path.join(recipe.autoencoder["output"], "final")
    if not (Path(autoencoder) / "config.json").is_file():
        train_autoencoder(recipe.autoencoder["output"], recipe.autoencoder["steps"], canvas=CANVAS, resume=True)
    data = recipe.data
    if not all(
        (Path(data["output"]) / f"{task}.jsonl").is_file() for task in ("understanding", "text_to_image", "edit")
    ):
        write_training_data(data["output"], data["seed"], data["questions"], data["prompts"], data["edits"], CANVAS)
    if not is_done(recipe.init):
        model, processor = initial_model(autoencoder)
        export_checkpoint(model, processor, recipe.init, model_name="shapes-emma-init")
    for stage, output in zip(recipe.stages, outputs):
        if not is_done(os.path.join(output, "final")):
            config = TrainConfig.from_yaml(stage)
            config.resume = True
            run_training(config)
    final = os.path.join(outputs[-1], "final")
    if not Path(recipe.sampler["output"]).is_file():
        settings = {key: value for key, value in recipe.sampler.items() if key != "output"}
        choice = choose_sampler(final, **settings)
        Path(recipe.sampler["output"]).write_text(json.dumps(choice, indent=2) + "\n")
    return final


def choose_sampler(
    checkpoint: str | Path,
    seed: int,
    prompts: int,
    edits: int,
    num_inference_steps: int,
    guidance_scale: list[float],
    image_guidance_scale: list[float],
) -> dict:
    """
    The guidance scales that score best on shapes scenes of `seed` (the mean of text-to-image and editing overall;
    the first listed wins a tie), with the score of every setting tried. The same noise serves every setting.
    """
    from ..pipeline_emma import EmmaPipeline

    if prompts < len(PROMPT_CATEGORIES) or edits < len(EDIT_TYPES):
        raise ValueError(
            f"the sampler needs at least one prompt per category ({len(PROMPT_CATEGORIES)}) and one edit per type "
            f"({len(EDIT_TYPES)}) to score; got prompts={prompts}, edits={edits}"
        )
    pipe = EmmaPipeline.from_pretrained(str(checkpoint), dtype=torch.float32)
    prompt_list, edit_list = prompt_set(seed + 1, prompts, CANVAS), edit_set(seed + 2, edits, CANVAS)

    def sampler(**scales) -> dict:
        generator = torch.Generator().manual_seed(seed)
        return {"num_inference_steps": num_inference_steps, "generator": generator, **scales}

    text_to_image = {g: score_prompts(pipe, prompt_list, **sampler(guidance_scale=g)).overall for g in guidance_scale}
    tried = [
        {
            "guidance_scale": g,
            "image_guidance_scale": gi,
            "text_to_image": text_to_image[g],
            "edit": score_edits(pipe, edit_list, **sampler(guidance_scale=g, image_guidance_scale=gi)).overall,
        }
        for g in guidance_scale
        for gi in image_guidance_scale
    ]
    best = max(tried, key=lambda row: row["text_to_image"] + row["edit"])
    defaults = {
        "num_inference_steps": num_inference_steps,
        **{k: best[k] for k in ("guidance_scale", "image_guidance_scale")},
    }
    return {"image_sampler_defaults": defaults, "seed": seed, "prompts": prompts, "edits": edits, "tried": tried}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emma_hf.shapes.recipe", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    run = steps.add_parser("run", help="every step of a recipe file that has not finished (resumable)")
    run.add_argument("recipe", help="e.g. examples/shapes/recipe.yaml")
    autoencoder = steps.add_parser("autoencoder", help="train the DC-AE")
    autoencoder.add_argument("output")
    autoencoder.add_argument("--steps", type=int, default=AUTOENCODER_STEPS)
    data = steps.add_parser("data", help="write the training data")
    data.add_argument("output")
    data.add_argument("--seed", type=int, default=0, help="seed of the scenes (evaluation uses 1234)")
    data.add_argument("--questions", type=int, default=NUM_QUESTIONS, help="understanding samples")
    data.add_argument("--prompts", type=int, default=NUM_PROMPTS, help="text-to-image samples")
    data.add_argument("--edits", type=int, default=NUM_EDITS, help="editing samples")
    init = steps.add_parser("init", help="write the randomly initialised EMMA checkpoint")
    init.add_argument("output")
    init.add_argument("--autoencoder", required=True)
    shipping = steps.add_parser("ship", help="copy a finished recipe's model into the package (bf16)")
    shipping.add_argument("recipe", help="e.g. examples/shapes/recipe.yaml")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.step == "run":
        print(f"wrote {run_recipe(args.recipe)}")
    elif args.step == "autoencoder":
        autoencoder = train_autoencoder(args.output, max_steps=args.steps, canvas=CANVAS).eval()
        print(f"wrote {args.output}; reconstructions pass the checker on {reconstruction_pass_rate(autoencoder):.3f}")
    elif args.step == "data":
        from tqdm.auto import tqdm

        files = write_training_data(args.output, args.seed, args.questions, args.prompts, args.edits, CANVAS, tqdm)
        print("\n".join(f"wrote {path}" for path in files.values()))
    elif args.step == "init":
        model, processor = initial_model(args.autoencoder)
        print(f"wrote {export_checkpoint(model, processor, args.output, model_name='shapes-emma-init')}")
    else:
        print(f"wrote {ship(args.recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
