"""Sets of prompts, questions and edits drawn with a seed, balanced over their kinds, and the training files."""

import json
import random
from collections.abc import Callable
from pathlib import Path

from ..processing_emma import words_of
from .world import (
    EDIT_TYPES,
    PROMPT_CATEGORIES,
    QUESTION_TYPES,
    Edit,
    Prompt,
    Question,
    Scene,
    random_edit,
    random_prompt,
    random_question,
    random_scene,
    render,
)


def question_set(seed: int, count: int, canvas: int = 96) -> list[tuple[Scene, Question]]:
    """`count` (scene, question) pairs, the question types in turn."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        scene = random_scene(rng, canvas)
        question = random_question(rng, scene, QUESTION_TYPES[len(pairs) % len(QUESTION_TYPES)])
        if question is not None:
            pairs.append((scene, question))
    return pairs


def prompt_set(seed: int, count: int, canvas: int = 96, training: bool = False) -> list[Prompt]:
    """`count` prompts, the categories in turn; `training` leaves out every prompt with a purple triangle."""
    rng = random.Random(seed)
    return [
        random_prompt(rng, PROMPT_CATEGORIES[i % len(PROMPT_CATEGORIES)], canvas, allow_held_out=not training)
        for i in range(count)
    ]


def edit_set(seed: int, count: int, canvas: int = 96, training: bool = False) -> list[Edit]:
    """`count` edits, the edit types in turn; `training` leaves out every edit whose target has a purple triangle."""
    rng = random.Random(seed)
    edits = []
    while len(edits) < count:
        edit = random_edit(rng, random_scene(rng, canvas), EDIT_TYPES[len(edits) % len(EDIT_TYPES)])
        if edit is not None and not (training and edit.target.holds_held_out()):
            edits.append(edit)
    return edits


def no_progress(iterable, **kwargs):
    """Stands in for `tqdm` where no progress bar is wanted."""
    return iterable


def write_training_data(
    folder: str | Path,
    seed: int,
    num_questions: int,
    num_prompts: int,
    num_edits: int,
    canvas: int = 96,
    progress: Callable | None = None,
) -> dict[str, Path]:
    """The three JSONL files of emma_hf.training (and their PNGs) for the shapes world, held-out split respected."""
    progress = progress or no_progress
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)

    def save(scene: Scene, name: str) -> str:
        render(scene).save(images / f"{name}.png")
        return f"images/{name}.png"

    records = {"understanding": [], "text_to_image": [], "edit": []}
    questions = question_set(seed, num_questions, canvas)
    for i, (scene, question) in enumerate(progress(questions, desc="questions")):
        content = [{"type": "image"}, {"type": "text", "text": question.text}]
        records["understanding"].append(
            {
                "images": [save(scene, f"question-{i}")],
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": question.answer}],
            }
        )
    for i, prompt in enumerate(progress(prompt_set(seed + 1, num_prompts, canvas, training=True), desc="prompts")):
        records["text_to_image"].append({"prompt": prompt.text, "image": save(prompt.scene, f"prompt-{i}")})
    for i, edit in enumerate(progress(edit_set(seed + 2, num_edits, canvas, training=True), desc="edits")):
        records["edit"].append(
            {
                "image": save(edit.source, f"edit-{i}-source"),
                "instruction": edit.instruction,
                "target": save(edit.target, f"edit-{i}-target"),
            }
        )
    paths = {}
    for task, rows in records.items():
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def sentences(seed: int = 0, size: int = 3000) -> list[str]:
    """Every kind of sentence of the world: questions, answers, prompts and edit instructions."""
    texts = []
    for _, question in question_set(seed, size):
        texts += [question.text, question.answer]
    texts += [prompt.text for prompt in prompt_set(seed, size)]
    return texts + [edit.instruction for edit in edit_set(seed, size)]


def corpus(seed: int = 0, size: int = 3000) -> list[str]:
    """The world's sentences and the chat roles, for training its tokenizer."""
    return sentences(seed, size) + ["user", "assistant", "system"]


def vocabulary(seed: int = 0, size: int = 3000) -> list[str]:
    """The words the world's sentences use: what the shapes model can understand (`EmmaProcessor.known_words`)."""
    return sorted({word for text in sentences(seed, size) for word in words_of(text)})
