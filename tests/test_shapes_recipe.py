"""The shapes recipe driver: every step once, nothing redone on a second run, a stage resumed from its checkpoint."""

import json
import os
from pathlib import Path

import pytest
import yaml

from emma_hf import EmmaConfig
from emma_hf.shapes.recipe import Recipe, is_done, run_recipe, ship


def write_miniature_recipe(root: Path) -> Path:
    """examples/shapes/recipe.yaml in miniature: 2 DC-AE steps, a few samples, stages of 2 steps."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "shapes"
    recipe = yaml.safe_load((examples / "recipe.yaml").read_text())
    recipe["autoencoder"]["steps"] = 2
    recipe["data"].update(questions=12, prompts=6, edits=6)
    recipe["sampler"].update(prompts=5, edits=5, num_inference_steps=2, guidance_scale=[1.0, 2.0])
    for name in recipe["stages"]:
        stage = yaml.safe_load((examples / name).read_text())
        stage["training"].update(max_steps=2, per_device_train_batch_size=2, save_steps=1, logging_steps=1)
        (root / "examples" / "shapes").mkdir(parents=True, exist_ok=True)
        (root / "examples" / "shapes" / name).write_text(yaml.safe_dump(stage))
    path = root / "examples" / "shapes" / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished_recipe(tmp_path_factory):
    path = write_miniature_recipe(tmp_path_factory.mktemp("recipe"))
    return path, run_recipe(path)


def test_the_recipe_makes_every_step_and_chains_the_stages(finished_recipe):
    path, final = finished_recipe
    runs = path.parents[2] / "runs" / "shapes"
    assert final == os.path.normpath(runs / "stage3-quality" / "final")
    assert (runs / "autoencoder" / "final" / "config.json").is_file()
    assert len((runs / "data" / "edit.jsonl").read_text().splitlines()) == 6
    assert all(is_done(runs / step) for step in ("init", "stage0-align/final", "stage2-sft/final", final))
    card = (Path(final) / "README.md").read_text()
    assert "from " + os.path.normpath(runs / "stage2-sft" / "final") in card


def test_the_recipe_chooses_the_sampler_that_scores_best_and_ship_writes_it(finished_recipe, tmp_path):
    path, final = finished_recipe
    choice = json.loads((path.parents[2] / "runs" / "shapes" / "sampler.json").read_text())
    tried = choice["tried"]
    assert [(row["guidance_scale"], row["image_guidance_scale"]) for row in tried] == [
        (g, gi) for g in (1.0, 2.0) for gi in (1.0, 1.5, 2.0)
    ]
    best = max(row["text_to_image"] + row["edit"] for row in tried)
    first_best = next(row for row in tried if row["text_to_image"] + row["edit"] == best)
    assert choice["image_sampler_defaults"] == {
        "num_inference_steps": 2,
        "guidance_scale": first_best["guidance_scale"],
        "image_guidance_scale": first_best["image_guidance_scale"],
    }
    shipped = ship(path, tmp_path / "shipped")
    assert EmmaConfig.from_pretrained(shipped).image_sampler_defaults == choice["image_sampler_defaults"]
    assert not (shipped / "model_index.json").exists() and not list(shipped.glob("*.py"))


def test_ship_refuses_an_unfinished_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="the recipe has not finished"):
        ship(write_miniature_recipe(tmp_path), tmp_path / "shipped")


def test_a_second_run_redoes_nothing(finished_recipe):
    path, final = finished_recipe
    runs = path.parents[2] / "runs" / "shapes"
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    assert run_recipe(path) == final
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before


def test_a_stage_stopped_after_its_last_checkpoint_finishes_without_training_more(finished_recipe):
    """Killed between its last checkpoint and its export, a stage resumes at max_steps and only exports."""
    path, final = finished_recipe
    stage = Path(final).parent
    weights = (Path(final) / "model" / "model.safetensors").read_bytes()
    (Path(final) / "README.md").unlink()
    run_recipe(path)
    assert is_done(final) and (Path(final) / "model" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in stage.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_recipe_whose_stages_do_not_chain_is_refused(tmp_path):
    path = write_miniature_recipe(tmp_path)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"] = [recipe["stages"][0], recipe["stages"][2]]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="stage2-sft.yaml: model must be .*stage0-align/final"):
        Recipe.from_yaml(path).stage_outputs()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"init": None}, "a recipe maps exactly"),
        ({"autoencoder": {"output": "x"}}, "autoencoder needs output and steps"),
    ],
)
def test_a_malformed_recipe_file_is_refused(tmp_path, change, message):
    path = write_miniature_recipe(tmp_path)
    recipe = {**yaml.safe_load(path.read_text()), **change}
    recipe = {key: value for key, value in recipe.items() if value is not None}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        Recipe.from_yaml(path)
