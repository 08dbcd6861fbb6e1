"""
The example notebooks run end to end on the shipped model: each in a fresh `python3` kernel (ipykernel's, on this
interpreter) with a temporary working directory, and what they print and show is checked.
"""

import base64
import io
import math
import re
from pathlib import Path

import nbformat
import PIL.Image
import pytest
from notebook_runner import EXAMPLES, NOTEBOOKS, execute
from safetensors import safe_open

from emma_hf.shapes.world import QUESTION_TYPES


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The notebook's code cells, in order."""
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def printed(cells: list[nbformat.NotebookNode]) -> str:
    """Everything the cells wrote to stdout, in order."""
    return "".join(
        output.text
        for cell in cells
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def outputs(cells: list[nbformat.NotebookNode]) -> list[nbformat.NotebookNode]:
    return [output for cell in cells for output in cell.outputs]


def shown_on_stderr(cells: list[nbformat.NotebookNode]) -> str:
    """What the cells wrote to stderr: progress bars, and warnings if any."""
    return "".join(o.text for o in outputs(cells) if o.output_type == "stream" and o.name == "stderr")


# Warnings a reader may see that come from inside other libraries, each with the reason.
THIRD_PARTY_WARNINGS = (
    # peft's get_peft_model reads `model.is_gradient_checkpointing`, deprecated since transformers 5.23.
    "FutureWarning: `is_gradient_checkpointing` is deprecated",
)


def unexpected_warnings(cells: list[nbformat.NotebookNode]) -> list[str]:
    """Warning lines on the cells' stderr (tqdm's `IProgress not found`, say), less the third-party ones above."""
    lines = [line for line in shown_on_stderr(cells).splitlines() if "Warning" in line]
    return [line for line in lines if not any(known in line for known in THIRD_PARTY_WARNINGS)]


def run_quietly(name: str, workdir: Path) -> nbformat.NotebookNode:
    """Execute the notebook; a warning shown to the reader fails, unless it is a known third-party one."""
    notebook = execute(name, workdir)
    assert not unexpected_warnings(code_cells(notebook))
    return notebook


def shown_images(notebook: nbformat.NotebookNode) -> list[PIL.Image.Image]:
    """The images the code cells displayed (their PNG outputs), in order."""
    return [
        PIL.Image.open(io.BytesIO(base64.b64decode(output.data["image/png"])))
        for cell in code_cells(notebook)
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_with_the_outputs_of_a_run(name: str):
    """Valid nbformat 4 for the `python3` kernel, every code cell run in order, and no warning or error shown."""
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4 and notebook.metadata.kernelspec.name == "python3"
    code = code_cells(notebook)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert any(cell.outputs for cell in code)
    assert not [output for output in outputs(code) if output.output_type == "error"]
    assert not unexpected_warnings(code)


def test_chat_notebook_answers_every_kind_of_question(tmp_path: Path):
    """Every question kind gets an answer next to its truth; the description is right; streaming prints one."""
    notebook = run_quietly("chat.ipynb", tmp_path)
    out = printed(code_cells(notebook))
    rows = re.findall(r"^(\w+) +\| (.+?) +\| answer: (.*) \| truth: (.*)$", out, flags=re.MULTILINE)
    assert [kind for kind, *_ in rows] == list(QUESTION_TYPES)
    assert all(answer.strip() for _, _, answer, _ in rows)
    describe = rows[QUESTION_TYPES.index("describe")]
    assert describe[2] == describe[3], describe
    assert re.search(rf"^\d/{len(QUESTION_TYPES)} answers match the ground truth$", out, flags=re.MULTILINE)
    streamed = printed(code_cells(notebook)[-1:])
    assert re.fullmatch(r"a \w+ \w+ at the .+", streamed.strip()), streamed


def test_text_to_image_notebook_draws_checks_and_edits(tmp_path: Path):
    """Ten 96x96 images, most passing the checker, shown in rows; edits shown after their source; an array output."""
    notebook = run_quietly("text_to_image_and_editing.ipynb", tmp_path)
    out = printed(code_cells(notebook))
    assert "10 images of size (96, 96)" in out
    passed = int(re.search(r"^(\d+)/10 images pass the checker$", out, flags=re.MULTILINE).group(1))
    assert passed >= 5, out
    # One row of two 96-pixel images per prompt (6-pixel gap, shown twice as large), then the source and its edits.
    images = shown_images(notebook)
    assert [image.size for image in images[:5]] == [(2 * (2 * 96 + 6), 2 * 96)] * 5
    num_edits = len(re.findall(r"^(?:pass|FAIL) \| (?:make|remove|add|move|replace) ", out, flags=re.MULTILINE))
    assert num_edits >= 3 and images[5].size == (2 * ((1 + num_edits) * (96 + 6) - 6), 2 * 96)
    assert "ndarray (1, 96, 96, 3) float32" in out
    swapped = re.findall(r"^DPM-Solver\+\+, (\d+) steps: (\d)/5 images pass the checker$", out, flags=re.MULTILINE)
    assert [steps for steps, _ in swapped] == ["10", "20"] and all(int(passing) >= 2 for _, passing in swapped), out
    # Two LoRA adapters: loaded, switched, mixed, scaled for one call, fused and unloaded.
    assert "loaded: {'model': ['first', 'second']} active: ['second']" in out
    changes = dict(re.findall(r"^(.+?) +\| largest pixel change from no adapter: (\d+)$", out, flags=re.MULTILINE))
    assert changes["no adapter"] == "0" and all(int(changes[label]) > 10 for label in changes if label != "no adapter")
    fused = int(re.search(r"^fused vs unfused first adapter, largest pixel change: (\d+)$", out, flags=re.M).group(1))
    assert fused <= 2 and "after unload_lora_weights: {} 0" in out


def test_lora_notebook_trains_saves_and_loads_an_adapter(tmp_path: Path):
    """The logged loss falls to a finite value; the adapter file holds only LoRA weights and loads into a pipeline."""
    out = printed(code_cells(run_quietly("lora_fine_tuning.ipynb", tmp_path)))
    losses = [float(loss) for loss in re.findall(r"^step +\d+ \| loss (\S+) \|", out, flags=re.MULTILINE)]
    final = float(re.search(r"^final training loss: (\S+)$", out, flags=re.MULTILINE).group(1))
    assert len(losses) == 12 and math.isfinite(final) and final == losses[-1] < losses[0]
    weights = tmp_path / "emma-shapes-lora" / "adapter" / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as adapter:
        names = list(adapter.keys())
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert "adapters: {'model': ['default_0']} active: ['default_0']" in out
