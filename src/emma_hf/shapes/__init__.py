"""The shapes world (docs/shapes.md): scenes, their words, a checker, training data and evaluation."""

from .checker import check_edit, check_prompt, detect
from .evaluate import evaluate, score_table
from .world import (
    Edit,
    Prompt,
    Question,
    Scene,
    ShapeObject,
    random_edit,
    random_prompt,
    random_question,
    random_scene,
    render,
)


__all__ = [
    "Edit",
    "Prompt",
    "Question",
    "Scene",
    "ShapeObject",
    "check_edit",
    "check_prompt",
    "detect",
    "evaluate",
    "random_edit",
    "random_prompt",
    "random_question",
    "random_scene",
    "render",
    "score_table",
]
