"""
Runs the example notebooks on the shipped model. `python tests/notebook_runner.py` re-executes them and stores
them with their outputs, which is what readers on GitHub or the Hub see; `tests/test_notebooks.py` executes them
again and checks what they print and show.
"""

import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ("chat.ipynb", "text_to_image_and_editing.ipynb", "lora_fine_tuning.ipynb")
CELL_TIMEOUT = 300


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    """Run every cell of `examples/name` with `workdir` as the kernel's working directory; a failing cell raises."""
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return notebook


def store_with_outputs(names: list[str]) -> None:
    for name in names:
        with tempfile.TemporaryDirectory() as workdir:
            notebook = execute(name, Path(workdir))
        nbformat.write(notebook, EXAMPLES / name)
        print(f"wrote {EXAMPLES / name}")


if __name__ == "__main__":
    store_with_outputs(sys.argv[1:] or list(NOTEBOOKS))
