"""
The checker of docs/shapes.md: read a scene back from pixels (palette classification, 8-connected components, shape
from fill ratio, cell from centroid) and judge prompts and edits against it.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .world import COLORS, Edit, Prompt, ShapeObject, prompt_passes


PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)
MAX_COLOR_DISTANCE = 80.0
MIN_AREA_FRACTION = 0.01
MIN_IOU = 0.8


@dataclass
class DetectedObject:
    color: str
    shape: str
    cell: int
    mask: np.ndarray

    @property
    def signature(self) -> tuple[str, str, int]:
        return self.color, self.shape, self.cell


def classify_pixels(image: PIL.Image.Image) -> np.ndarray:
    """Palette index of each pixel (nearest colour within distance 80), -1 for background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)
    nearest = distances.argmin(-1)
    return np.where(distances.min(-1) < MAX_COLOR_DISTANCE, nearest, -1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (label propagation by 3x3 max-pooling until stable)."""
    if not mask.any():
        return []
    inside = torch.from_numpy(mask)[None, None].float()
    labels = torch.arange(1, mask.size + 1, dtype=torch.float32).reshape(1, 1, *mask.shape) * inside
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * inside
        if torch.equal(grown, labels):
            break
        labels = grown
    labels = labels[0, 0].numpy()
    return [labels == value for value in np.unique(labels[labels > 0])]


def shape_from_fill(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    ratio = mask.sum() / box_area
    if ratio >= 0.85:
        return "square"
    if ratio >= 0.65:
        return "circle"
    if ratio >= 0.35:
        return "triangle"
    return "unknown"


def detect(image: PIL.Image.Image) -> list[DetectedObject]:
    """Every object the checker sees in `image`, in reading order."""
    classes = classify_pixels(image)
    height, width = classes.shape
    found = []
    for index, color in enumerate(COLOR_NAMES):
        for mask in connected_components(classes == index):
            if mask.sum() < MIN_AREA_FRACTION * height * width:
                continue
            rows, cols = np.nonzero(mask)
            row = min(2, int(rows.mean() * 3 // height))
            column = min(2, int(cols.mean() * 3 // width))
            found.append(DetectedObject(color, shape_from_fill(mask), 3 * row + column, mask))
    return sorted(found, key=lambda o: (o.cell, o.color, o.shape))


def signature(objects: list[DetectedObject]) -> list[tuple[str, str, int]]:
    return sorted(o.signature for o in objects)


def check_prompt(prompt: Prompt, image: PIL.Image.Image) -> bool:
    """Whether a generated image passes its prompt's category rule."""
    detected = signature(detect(image))
    return all(shape != "unknown" for _, shape, _ in detected) and prompt_passes(prompt, detected)


def find(objects: list[DetectedObject], obj: ShapeObject) -> DetectedObject | None:
    matches = [o for o in objects if o.signature == (obj.color, obj.shape, obj.cell)]
    return matches[0] if len(matches) == 1 else None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def check_edit(edit: Edit, source_image: PIL.Image.Image, edited_image: PIL.Image.Image) -> bool:
    """The edited image shows exactly the target scene, and every object not named keeps its mask (IoU >= 0.8)."""
    edited = detect(edited_image)
    if signature(edited) != edit.target.signature():
        return False
    source = detect(source_image)
    for before, after in edit.untouched:
        old, new = find(source, before), find(edited, after)
        if old is None or new is None or iou(old.mask, new.mask) < MIN_IOU:
            return False
    return True
