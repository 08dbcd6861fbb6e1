"""The shapes-world EMMA that ships with the package (exported Hub layout, bf16), found without network."""

from pathlib import Path


SHAPES_MODEL = Path(__file__).with_name("shapes-emma")


def shipped_model_path() -> Path:
    """Folder of the shipped model; loads with `AutoModel*`, `AutoProcessor` and `EmmaPipeline.from_pretrained`."""
    if not (SHAPES_MODEL / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped shapes model is missing from {SHAPES_MODEL}; reinstall emma_hf or pass --model"
        )
    return SHAPES_MODEL
