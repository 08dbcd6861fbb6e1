"""
The shapes world of docs/shapes.md: scenes of coloured shapes on a 3x3 grid, their rendering, and the words used to
talk about them (prompts, questions and answers, edit instructions), each generated with its ground truth.
"""

import random
from dataclasses import dataclass, replace

import PIL.Image
import PIL.ImageDraw


COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three")
PROMPT_CATEGORIES = ("single object", "position", "two objects", "counting", "relation")
QUESTION_TYPES = ("color", "shape", "count", "where", "exists", "describe")
EDIT_TYPES = ("recolor", "remove", "add", "move", "replace")
HELD_OUT = ("purple", "triangle")
SUPERSAMPLING = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is, its grid cell, and exactly where it is drawn (box side and offset, in pixels)."""

    color: str
    shape: str
    cell: int
    size: float = 0.0
    dx: float = 0.0
    dy: float = 0.0

    @property
    def kind(self) -> tuple[str, str]:
        return self.color, self.shape

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def column(self) -> int:
        return self.cell % 3

    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    canvas: int = 128

    def signature(self) -> list[tuple[str, str, int]]:
        """What the checker can see: (color, shape, cell) of every object, sorted."""
        return sorted((o.color, o.shape, o.cell) for o in self.objects)

    def holds_held_out(self) -> bool:
        return any(o.kind == HELD_OUT for o in self.objects)

    def empty_cells(self) -> list[int]:
        used = {o.cell for o in self.objects}
        return [cell for cell in range(9) if cell not in used]


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    return {
        "to the left of": a.column < b.column,
        "to the right of": a.column > b.column,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def placed(rng: random.Random, color: str, shape: str, cell: int, canvas: int) -> ShapeObject:
    """An object with a random box side (0.22 S ± 10 %) and offset (at most 0.04 S per axis)."""
    return ShapeObject(
        color,
        shape,
        cell,
        size=0.22 * canvas * rng.uniform(0.9, 1.1),
        dx=rng.uniform(-0.04, 0.04) * canvas,
        dy=rng.uniform(-0.04, 0.04) * canvas,
    )


def moved(rng: random.Random, obj: ShapeObject, canvas: int, **changes) -> ShapeObject:
    """The same object with some fields changed; a new cell gets a new random offset."""
    if "cell" in changes:
        changes |= {"dx": rng.uniform(-0.04, 0.04) * canvas, "dy": rng.uniform(-0.04, 0.04) * canvas}
    return replace(obj, **changes)


def render(scene: Scene) -> PIL.Image.Image:
    """Draw the scene (anti-aliased by supersampling) on a white square canvas."""
    scale = SUPERSAMPLING
    side = scene.canvas * scale
    image = PIL.Image.new("RGB", (side, side), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(image)
    third = scene.canvas / 3
    for obj in scene.objects:
        cx = ((obj.column + 0.5) * third + obj.dx) * scale
        cy = ((obj.row + 0.5) * third + obj.dy) * scale
        half = obj.size * scale / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image.resize((scene.canvas, scene.canvas), PIL.Image.Resampling.BOX)


def random_scene(rng: random.Random, canvas: int = 128, num_objects: int | None = None) -> Scene:
    count = num_objects or rng.randint(1, 3)
    cells = rng.sample(range(9), count)
    return Scene(
        tuple(placed(rng, rng.choice(list(COLORS)), rng.choice(SHAPES), cell, canvas) for cell in cells), canvas
    )


def random_kind(rng: random.Random, allow_held_out: bool = True) -> tuple[str, str]:
    while True:
        kind = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if allow_held_out or kind != HELD_OUT:
            return kind


@dataclass(frozen=True)
class Prompt:
    """A text-to-image prompt, its category, and a scene that satisfies it."""

    category: str
    text: str
    scene: Scene
    count: int | None = None
    relation: str | None = None

    def mentions_held_out(self) -> bool:
        return self.scene.holds_held_out()


def random_prompt(rng: random.Random, category: str, canvas: int = 128, allow_held_out: bool = True) -> Prompt:
    """A prompt of `category` (docs/shapes.md) with an example scene."""
    if category not in PROMPT_CATEGORIES:
        raise ValueError(f"category must be one of {PROMPT_CATEGORIES}, got {category!r}")
    kind = random_kind(rng, allow_held_out)
    if category in ("single object", "position"):
        obj = placed(rng, *kind, rng.randrange(9), canvas)
        text = f"a {kind[0]} {kind[1]}" + (f" at the {CELLS[obj.cell]}" if category == "position" else "")
        return Prompt(category, text, Scene((obj,), canvas))
    if category == "counting":
        count = rng.choice((2, 3))
        objects = tuple(placed(rng, *kind, cell, canvas) for cell in rng.sample(range(9), count))
        return Prompt(category, f"{NUMBERS[count]} {kind[0]} {kind[1]}s", Scene(objects, canvas), count=count)
    while True:
        other = random_kind(rng, allow_held_out)
        if other != kind:
            break
    first_cell, second_cell = rng.sample(range(9), 2)
    first, second = placed(rng, *kind, first_cell, canvas), placed(rng, *other, second_cell, canvas)
    if category == "two objects":
        return Prompt(category, f"{first.phrase()} and {second.phrase()}", Scene((first, second), canvas))
    relations = [r for r in RELATIONS if relation_holds(first, r, second)]
    while not relations:
        second = placed(rng, *other, rng.choice([c for c in range(9) if c != first_cell]), canvas)
        relations = [r for r in RELATIONS if relation_holds(first, r, second)]
    relation = rng.choice(relations)
    return Prompt(
        category, f"{first.phrase()} {relation} {second.phrase()}", Scene((first, second), canvas), relation=relation
    )


def prompt_passes(prompt: Prompt, detected: list[tuple[str, str, int]]) -> bool:
    """The pass rule of the prompt's category, on a detected scene's (color, shape, cell) list."""
    expected = prompt.scene.signature()
    kinds = sorted((color, shape) for color, shape, _ in detected)
    if prompt.category == "single object":
        return kinds == [prompt.scene.objects[0].kind]
    if prompt.category == "position":
        return detected == expected
    if prompt.category == "counting":
        return kinds == [prompt.scene.objects[0].kind] * prompt.count
    if kinds != sorted(o.kind for o in prompt.scene.objects):
        return False
    if prompt.category == "two objects":
        return True
    first, second = prompt.scene.objects
    found = {(color, shape): cell for color, shape, cell in detected}
    return relation_holds(
        ShapeObject(*first.kind, found[first.kind]), prompt.relation, ShapeObject(*second.kind, found[second.kind])
    )


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def describe(scene: Scene) -> str:
    """Objects in reading order (row, then column), as docs/shapes.md words them."""
    ordered = sorted(scene.objects, key=lambda o: o.cell)
    return " and ".join(f"{o.phrase()} at the {CELLS[o.cell]}" for o in ordered)


def unique_by(objects, key) -> list[ShapeObject]:
    """The objects that `key` (a shape, a colour, a kind) names without ambiguity."""
    values = [key(o) for o in objects]
    return [o for o in objects if values.count(key(o)) == 1]


def random_question(rng: random.Random, scene: Scene, kind: str) -> Question | None:
    """A question of `kind` about `scene` with its exact answer, or None where the scene cannot ask it."""
    objects = scene.objects
    if kind in ("color", "shape", "where"):
        key = {"color": lambda o: o.shape, "shape": lambda o: o.color, "where": lambda o: o.kind}[kind]
        unique = unique_by(objects, key)
        if not unique:
            return None
        obj = rng.choice(unique)
        text, answer = {
            "color": (f"what color is the {obj.shape}?", obj.color),
            "shape": (f"what shape is the {obj.color} object?", obj.shape),
            "where": (f"where is the {obj.color} {obj.shape}?", CELLS[obj.cell]),
        }[kind]
        return Question(kind, text, answer)
    if kind == "count":
        shape = rng.choice(SHAPES)
        return Question(kind, f"how many {shape}s are there?", NUMBERS[sum(o.shape == shape for o in objects)])
    if kind == "exists":
        color, shape = rng.choice([o.kind for o in objects]) if rng.random() < 0.5 else random_kind(rng)
        answer = "yes" if any(o.kind == (color, shape) for o in objects) else "no"
        return Question(kind, f"is there a {color} {shape}?", answer)
    if kind == "describe":
        return Question(kind, "describe the image.", describe(scene))
    raise ValueError(f"question kind must be one of {QUESTION_TYPES}, got {kind!r}")


@dataclass(frozen=True)
class Edit:
    """An instruction, the scene before and after, and the (before, after) pairs of objects it does not name."""

    kind: str
    instruction: str
    source: Scene
    target: Scene
    untouched: tuple[tuple[ShapeObject, ShapeObject], ...]


def random_edit(rng: random.Random, scene: Scene, kind: str) -> Edit | None:
    """An edit of `kind` applied to `scene`, or None where the scene does not allow it (e.g. no empty cell)."""
    if kind not in EDIT_TYPES:
        raise ValueError(f"edit kind must be one of {EDIT_TYPES}, got {kind!r}")
    objects = list(scene.objects)
    kinds = [o.kind for o in objects]
    canvas = scene.canvas
    if kind == "add":
        if len(objects) >= 3:
            return None
        color, shape = random_kind(rng)
        if (color, shape) in kinds:
            return None
        cell = rng.choice(scene.empty_cells())
        new = placed(rng, color, shape, cell, canvas)
        target = Scene((*objects, new), canvas)
        return Edit(kind, f"add a {color} {shape} at the {CELLS[cell]}", scene, target, tuple((o, o) for o in objects))
    named = [i for i, o in enumerate(objects) if o in unique_by(objects, lambda item: item.kind)]
    if not named:
        return None
    index = rng.choice(named)
    obj = objects[index]
    others = [o for i, o in enumerate(objects) if i != index]
    untouched = tuple((o, o) for o in others)
    if kind == "remove":
        if not others:
            return None
        return Edit(kind, f"remove the {obj.color} {obj.shape}", scene, Scene(tuple(others), canvas), untouched)
    if kind == "recolor":
        color = rng.choice([c for c in COLORS if c != obj.color and (c, obj.shape) not in kinds])
        changed, instruction = replace(obj, color=color), f"make the {obj.color} {obj.shape} {color}"
    elif kind == "move":
        changed = moved(rng, obj, canvas, cell=rng.choice(scene.empty_cells()))
        instruction = f"move the {obj.color} {obj.shape} to the {CELLS[changed.cell]}"
    else:
        options = [(c, s) for c in COLORS for s in SHAPES if c != obj.color and s != obj.shape and (c, s) not in kinds]
        color, shape = rng.choice(options)
        changed = replace(obj, color=color, shape=shape)
        instruction = f"replace the {obj.color} {obj.shape} with a {color} {shape}"
    objects[index] = changed
    return Edit(kind, instruction, scene, Scene(tuple(objects), canvas), untouched)
