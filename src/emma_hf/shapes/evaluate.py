"""The scores of docs/shapes.md for an EMMA pipeline: understanding, text-to-image and editing, per kind and overall,
with the held-out `purple triangle` rows apart."""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .checker import check_edit, check_prompt
from .data import edit_set, no_progress, prompt_set, question_set
from .world import EDIT_TYPES, HELD_OUT, PROMPT_CATEGORIES, QUESTION_TYPES, render


HELD_OUT_ROW = "purple triangle (held out)"


@dataclass
class TaskScores:
    """Pass counts per kind; `overall` is the mean over the kinds (docs/shapes.md), `held_out` apart."""

    kinds: tuple[str, ...]
    passed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, ok: bool, held_out: bool = False) -> None:
        for row in (kind, HELD_OUT_ROW) if held_out else (kind,):
            self.passed[row] += int(ok)
            self.total[row] += 1

    def rate(self, row: str) -> float:
        return self.passed[row] / self.total[row] if self.total[row] else float("nan")

    @property
    def overall(self) -> float:
        return sum(self.rate(kind) for kind in self.kinds) / len(self.kinds)

    def rows(self) -> list[tuple[str, float, int]]:
        rows = [(kind, self.rate(kind), self.total[kind]) for kind in self.kinds]
        rows.append(("overall (mean of kinds)", self.overall, sum(self.total[k] for k in self.kinds)))
        if self.total[HELD_OUT_ROW]:
            rows.append((HELD_OUT_ROW, self.rate(HELD_OUT_ROW), self.total[HELD_OUT_ROW]))
        return rows


def mentions_held_out(text: str) -> bool:
    return " ".join(HELD_OUT) in text


def answer_questions(
    pipe, questions: list, batch_size: int, max_new_tokens: int = 48, progress: Callable | None = None
) -> list[str]:
    """Greedy answers of the chat model to (scene, question) pairs, in batches."""
    model, processor = pipe.model, pipe.processor
    progress = progress or no_progress
    answers = []
    for start in progress(range(0, len(questions), batch_size), desc="understanding"):
        chunk = questions[start : start + batch_size]
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.text}]}]
            for _, question in chunk
        ]
        texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        inputs = processor(text=texts, images=[render(scene) for scene, _ in chunk], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
        answers += [
            a.strip() for a in processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1] :])
        ]
    return answers


def canvas_of(pipe) -> int:
    """The side the pipeline's processor reads and draws shapes scenes at."""
    return pipe.processor.image_processor.size.height or 96


def evaluate(
    pipe,
    seed: int = 1234,
    num_questions: int = 500,
    num_prompts: int = 200,
    num_edits: int = 200,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    batch_size: int = 25,
    progress: Callable | None = None,
) -> dict[str, TaskScores]:
    """
    Score the pipeline's model on freshly drawn scenes (`seed` must be one training never used); sampler settings
    left as None are the checkpoint's.
    """
    for name, count in (("num_questions", num_questions), ("num_prompts", num_prompts), ("num_edits", num_edits)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{name} must be an integer >= 1 (a score needs samples), got {count!r}")
    canvas = canvas_of(pipe)
    progress = progress or no_progress
    scores = {"understanding": TaskScores(QUESTION_TYPES)}
    questions = question_set(seed, num_questions, canvas)
    answers = answer_questions(pipe, questions, batch_size, progress=progress)
    for (_, question), answer in zip(questions, answers):
        scores["understanding"].add(question.kind, answer == question.answer, mentions_held_out(question.text))

    generator = torch.Generator().manual_seed(seed)
    settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "generator": generator}
    prompts = prompt_set(seed + 1, num_prompts, canvas)
    scores["text_to_image"] = score_prompts(pipe, prompts, batch_size, progress, **settings)
    edits = edit_set(seed + 2, num_edits, canvas)
    scores["edit"] = score_edits(
        pipe, edits, batch_size, progress, image_guidance_scale=image_guidance_scale, **settings
    )
    return scores


def score_prompts(
    pipe, prompts: list, batch_size: int = 25, progress: Callable | None = None, **sampler
) -> TaskScores:
    """Draw each prompt with the pipeline (`sampler`: its call's settings) and check the image."""
    canvas = canvas_of(pipe)
    scores = TaskScores(PROMPT_CATEGORIES)
    for start in (progress or no_progress)(range(0, len(prompts), batch_size), desc="text-to-image"):
        chunk = prompts[start : start + batch_size]
        images = pipe([p.text for p in chunk], height=canvas, width=canvas, **sampler).images
        for prompt, image in zip(chunk, images):
            scores.add(prompt.category, check_prompt(prompt, image), prompt.mentions_held_out())
    return scores


def score_edits(pipe, edits: list, batch_size: int = 25, progress: Callable | None = None, **sampler) -> TaskScores:
    """Edit each source scene with the pipeline (`sampler`: its call's settings) and check the result."""
    canvas = canvas_of(pipe)
    scores = TaskScores(EDIT_TYPES)
    for start in (progress or no_progress)(range(0, len(edits), batch_size), desc="editing"):
        chunk = edits[start : start + batch_size]
        sources = [render(edit.source) for edit in chunk]
        images = pipe(
            [edit.instruction for edit in chunk], image=sources, height=canvas, width=canvas, **sampler
        ).images
        for edit, source, image in zip(chunk, sources, images):
            scores.add(edit.kind, check_edit(edit, source, image), edit.target.holds_held_out())
    return scores


def score_table(scores: dict[str, TaskScores]) -> str:
    """The scores as a Markdown table."""
    lines = ["| task | kind | score | n |", "| --- | --- | --- | --- |"]
    for task, task_scores in scores.items():
        for kind, rate, count in task_scores.rows():
            lines.append(f"| {task} | {kind} | {rate:.3f} | {count} |")
    return "\n".join(lines)
