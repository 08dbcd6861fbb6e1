"""The shapes world: rendering, words with their ground truth, the checker reading rendered scenes back exactly."""

import random

import numpy as np
import pytest

from emma_hf.shapes.checker import check_edit, check_prompt, detect, signature
from emma_hf.shapes.data import edit_set, prompt_set, question_set, write_training_data
from emma_hf.shapes.world import (
    CELLS,
    COLORS,
    EDIT_TYPES,
    PROMPT_CATEGORIES,
    QUESTION_TYPES,
    Scene,
    ShapeObject,
    describe,
    random_scene,
    render,
)


@pytest.mark.parametrize("canvas", [96, 128])
def test_checker_reads_rendered_scenes_back_exactly(canvas):
    rng = random.Random(canvas)
    for _ in range(150):
        scene = random_scene(rng, canvas)
        assert signature(detect(render(scene))) == scene.signature()


def test_closest_neighbours_of_one_colour_stay_apart():
    """The worst case the spec allows: largest boxes, offsets towards each other, same colour in adjacent cells."""
    for canvas in (96, 128):
        size, shift = 0.22 * canvas * 1.1, 0.04 * canvas
        left = ShapeObject("red", "square", 3, size, shift, shift)
        right = ShapeObject("red", "square", 4, size, -shift, shift)
        below = ShapeObject("red", "circle", 7, size, -shift, -shift)
        scene = Scene((left, right, below), canvas)
        assert signature(detect(render(scene))) == scene.signature()


def test_palette_and_canvas_follow_the_spec():
    scene = Scene((ShapeObject("yellow", "square", 4, 30.0),), 96)
    pixels = np.asarray(render(scene))
    assert pixels.shape == (96, 96, 3) and tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[48, 48]) == COLORS["yellow"]


def test_prompts_pass_on_their_own_scenes_and_fail_on_others():
    prompts = prompt_set(seed=3, count=100, canvas=96)
    assert [p.category for p in prompts[:5]] == list(PROMPT_CATEGORIES)
    for prompt in prompts:
        assert check_prompt(prompt, render(prompt.scene)), prompt.text
    empty = render(Scene((), 96))
    assert not any(check_prompt(prompt, empty) for prompt in prompts)
    shuffled = prompts[1:] + prompts[:1]
    assert sum(check_prompt(p, render(other.scene)) for p, other in zip(prompts, shuffled)) < 10


def test_edits_pass_on_their_targets_and_fail_on_the_source():
    edits = edit_set(seed=4, count=100, canvas=96)
    assert [e.kind for e in edits[:5]] == list(EDIT_TYPES)
    for edit in edits:
        source, target = render(edit.source), render(edit.target)
        assert check_edit(edit, source, target), edit.instruction
        assert not check_edit(edit, source, source), edit.instruction


REDRAWS = {
    "shifted within its cell": lambda o, canvas: ShapeObject(
        o.color, o.shape, o.cell, o.size, o.dx - 0.08 * canvas if o.dx > 0 else o.dx + 0.08 * canvas, o.dy
    ),
    "redrawn smaller": lambda o, canvas: ShapeObject(o.color, o.shape, o.cell, o.size * 0.75, o.dx, o.dy),
}


@pytest.mark.parametrize("redraw", REDRAWS)
def test_an_edit_that_redraws_an_untouched_object_fails(redraw):
    """Same colours, shapes and cells everywhere, so only the preservation rule (mask IoU >= 0.8) can catch it."""
    canvas = 96
    for edit in [e for e in edit_set(seed=5, count=60, canvas=canvas) if e.untouched][:10]:
        before, _ = edit.untouched[0]
        redrawn = Scene(
            tuple(o if o is not before else REDRAWS[redraw](o, canvas) for o in edit.target.objects), canvas
        )
        assert signature(detect(render(redrawn))) == edit.target.signature(), edit.instruction
        assert check_edit(edit, render(edit.source), render(edit.target)), edit.instruction
        assert not check_edit(edit, render(edit.source), render(redrawn)), edit.instruction


def test_questions_have_exact_answers():
    pairs = question_set(seed=6, count=120, canvas=96)
    assert [q.kind for _, q in pairs[:6]] == list(QUESTION_TYPES)
    for scene, question in pairs:
        if question.kind == "describe":
            assert question.answer == describe(scene) and question.answer.startswith("a ")
        if question.kind == "where":
            assert question.answer in CELLS
        if question.kind == "count":
            assert question.answer in ("zero", "one", "two", "three")


def test_training_data_keeps_the_held_out_pair_out_of_generation(tmp_path):
    paths = write_training_data(tmp_path, seed=7, num_questions=60, num_prompts=200, num_edits=200)
    prompts = paths["text_to_image"].read_text()
    assert "purple triangle" not in prompts and len(prompts.splitlines()) == 200
    held_out_targets = [
        e for e in edit_set(seed=7 + 2, count=200, canvas=96, training=True) if e.target.holds_held_out()
    ]
    assert not held_out_targets
    assert "purple" in paths["understanding"].read_text() and "triangle" in paths["understanding"].read_text()


def test_the_reconstruction_pass_rate_tells_a_trained_dc_ae_from_an_untrained_one():
    from diffusers import AutoencoderDC

    from emma_hf import EmmaForConditionalGeneration
    from emma_hf.shapes.autoencoder import SHAPES_DC_AE_CONFIG, reconstruction_pass_rate
    from emma_hf.shipped import shipped_model_path

    trained = EmmaForConditionalGeneration.from_pretrained(shipped_model_path()).model.vae.eval()
    assert reconstruction_pass_rate(trained, num_scenes=20) >= 0.85  # 189 of 200 measured
    assert reconstruction_pass_rate(AutoencoderDC(**SHAPES_DC_AE_CONFIG).eval(), num_scenes=5) == 0.0
