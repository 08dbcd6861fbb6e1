"""The `emma-hf demo` contact sheet: prompts with their images, edits as before/after pairs, questions with answers."""

import PIL.Image
import PIL.ImageDraw

from .data import edit_set, prompt_set, question_set
from .evaluate import answer_questions
from .world import render


DEMO_SEED = 2026
TILE = 96
PAD = 8
TEXT_HEIGHT = 30


def caption(draw: PIL.ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    """Text wrapped to `width` pixels (the default bitmap font, so nothing is downloaded)."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    draw.multiline_text(xy, "\n".join(lines[:3]), fill=(0, 0, 0), spacing=1)


def contact_sheet(
    pipe, num_prompts: int = 5, num_edits: int = 3, num_questions: int = 4, **settings
) -> PIL.Image.Image:
    """One PNG with a row per task; `settings` go to the pipeline (steps, guidance, generator)."""
    canvas = pipe.processor.image_processor.size.height or TILE
    image_guidance_scale = settings.pop("image_guidance_scale", None)
    prompts = prompt_set(DEMO_SEED, num_prompts, canvas)
    drawn = pipe([p.text for p in prompts], height=canvas, width=canvas, **settings).images
    edits = edit_set(DEMO_SEED, num_edits, canvas)
    sources = [render(e.source) for e in edits]
    edited = pipe(
        [e.instruction for e in edits], image=sources, image_guidance_scale=image_guidance_scale, **settings
    ).images
    questions = question_set(DEMO_SEED, num_questions, canvas)
    answers = answer_questions(pipe, questions, batch_size=num_questions)

    cell = TILE + 2 * PAD
    columns = max(num_prompts, 2 * num_edits, num_questions)
    row_height = TILE + TEXT_HEIGHT + 2 * PAD
    sheet = PIL.Image.new("RGB", (columns * cell, 3 * (row_height + 16)), (245, 245, 245))
    draw = PIL.ImageDraw.Draw(sheet)
    rows = [
        ("text to image", [(image, prompt.text) for image, prompt in zip(drawn, prompts)]),
        (
            "editing (before, after)",
            [
                pair
                for source, e, out in zip(sources, edits, edited)
                for pair in ((source, "before"), (out, e.instruction))
            ],
        ),
        (
            "understanding",
            [(render(scene), f"{q.text} -> {answer}") for (scene, q), answer in zip(questions, answers)],
        ),
    ]
    for index, (title, tiles) in enumerate(rows):
        top = index * (row_height + 16)
        draw.text((PAD, top + 2), title, fill=(90, 90, 90))
        for column, (image, text) in enumerate(tiles):
            left = column * cell + PAD
            sheet.paste(image.resize((TILE, TILE)), (left, top + 16))
            caption(draw, (left, top + 16 + TILE + 2), text, TILE + PAD)
    return sheet
