"""
Every README block, run as printed and in order, in a folder laid out like a clone: a new user's first hour. A block
that cannot run here has `<!-- not run: REASON -->` on the line above it and is reported as skipped with that reason.
What the blocks print is checked against what the README says they print.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from emma_hf import shipped_model_path
from emma_hf.processing_emma import words_of


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
# The blocks' installs are what this environment already holds: `.ci/run` builds it by running them.
INSTALLS = re.compile(r"^(?:pip install (?:[^&]|&(?!&))+&&\s*)+")
# Runs README Python blocks in one namespace, as a notebook or a REPL session would, marking where each begins.
PYTHON_SESSION = textwrap.dedent(
    """
    import json, sys

    namespace = {"__name__": "__main__"}
    for index, code in enumerate(json.load(open(sys.argv[1]))):
        print(f"<<block {index}>>", flush=True)
        exec(compile(code, f"README python block {index}", "exec"), namespace)
    """
)


@dataclass
class Block:
    section: str
    language: str
    code: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.section}: {self.code.splitlines()[0][:60]}"


def readme_blocks() -> list[Block]:
    blocks, section, lines = [], "", README.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("```"):
            end = lines.index("```", index + 1)
            reason = NOT_RUN.fullmatch(lines[index - 1])
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(section, line[3:], code, reason and reason.group(1)))
            index = end
        index += 1
    return blocks


BLOCKS = readme_blocks()


def section(title: str) -> str:
    """The README text under `## title`, up to the next heading of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def clone_layout(folder: Path) -> Path:
    """The paths README blocks use: `examples/` (copied: recipes resolve paths from their own place) and the package."""
    shutil.copytree(ROOT / "examples", folder / "examples")
    shipped = folder / "src" / "emma_hf" / "shipped" / "shapes-emma"
    shipped.parent.mkdir(parents=True)
    shipped.symlink_to(shipped_model_path(), target_is_directory=True)
    return folder


def run(arguments: list[str], cwd: Path, block: Block) -> str:
    """Run with this interpreter's scripts (`python`, `emma-hf`) first on PATH, offline; no warnings allowed."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, f"{block.name}\n{result.stderr[-4000:]}"
    assert "warn" not in result.stderr.lower(), f"{block.name} warned:\n{result.stderr[-4000:]}"
    return result.stdout


def score_rows(text: str) -> dict[tuple[str, str], str]:
    """`(task, kind) -> score` from a table as `emma-hf eval` prints it and the README shows it."""
    return {
        (task, kind): score
        for task, kind, score in re.findall(r"^\| (\w+) \| ([^|]+?) \| ([\d.]+) \|", text, flags=re.MULTILINE)
    }


def test_every_block_runs_or_says_why_not():
    assert {block.language for block in BLOCKS} == {"bash", "python"}
    assert sum(block.not_run is None for block in BLOCKS) >= 6
    for block in BLOCKS:
        if block.not_run is None and block.language == "bash":
            stripped = INSTALLS.sub("", block.code)
            assert "pip install" not in stripped, f"{block.name}: installs must come first, then the commands"


@pytest.mark.parametrize(
    "block", [block for block in BLOCKS if block.not_run], ids=lambda block: block.name.split(":")[0]
)
def test_blocks_not_run_here(block: Block):
    pytest.skip(f"README block {block.name!r}: {block.not_run}")


def test_a_new_user_follows_the_readme(tmp_path):
    folder = clone_layout(tmp_path)
    printed = {}
    python_blocks = [block for block in BLOCKS if block.not_run is None and block.language == "python"]
    for block in BLOCKS:
        if block.not_run is None and block.language == "bash":
            printed[block.code] = run(["bash", "-euo", "pipefail", "-c", INSTALLS.sub("", block.code)], folder, block)
        elif block is python_blocks[0]:
            session = tmp_path / "blocks.json"
            session.write_text(json.dumps([python.code for python in python_blocks]))
            output = run([sys.executable, "-c", PYTHON_SESSION, str(session)], folder, block)
            for python, text in zip(python_blocks, re.split(r"^<<block \d+>>\n", output, flags=re.MULTILINE)[1:]):
                printed[python.code] = text

    def printed_by(fragment: str) -> str:
        (text,) = [text for code, text in printed.items() if fragment in code]
        return text

    assert len(printed) == sum(block.not_run is None for block in BLOCKS)
    assert "wrote emma-demo.png" in printed_by("emma-hf demo") and (folder / "emma-demo.png").is_file()
    assert (folder / "drawing.png").is_file() and (folder / "edited.png").is_file()

    # The commands: the edit made the circle green, the scores are the README's table, EMMA-4B's size is stated.
    commands = printed_by("emma-hf chat --image edited.png")
    assert commands.split("wrote edited.png\n", 1)[1].splitlines()[0] == "green"
    assert score_rows(commands) == score_rows(section("Run it"))
    assert re.search(r"^total +6699\.\d\dM$", commands, flags=re.MULTILINE)

    # The chat snippet describes the drawing in the shapes world's words, as the README's question asks.
    assert "a red circle at the top left" in printed_by('"text": "describe the image."')
    # Compiled static-cache decoding writes the tokens of eager decoding.
    assert printed_by('cache_implementation="static"') == "True\n"

    # The fine-tuning quickstart prints the scores the README shows for the adapter.
    documented = re.findall(
        r"^\| ([\w-]+) \(\d+ \w+\) \| ([\d.]+) \| ([\d.]+) \|$", section("Fine-tune it"), flags=re.MULTILINE
    )
    tasks = {"understanding": "understanding", "text-to-image": "text_to_image", "editing": "edit"}
    with_lora = {tasks[name]: score for name, _, score in documented}
    fine_tune = printed_by("emma-hf train examples/shapes/lora-quickstart.yaml")
    assert {task: score for (task, kind), score in score_rows(fine_tune).items() if kind.startswith("overall")} == (
        with_lora
    )
    assert (folder / "runs" / "shapes-lora" / "final" / "adapter_model.safetensors").is_file()


def test_the_shipped_models_words_are_documented():
    """docs/shapes.md lists the words the shipped model knows, as the README says."""
    known = set(json.loads((shipped_model_path() / "processor_config.json").read_text())["known_words"])
    shapes_doc = (ROOT / "docs" / "shapes.md").read_text()
    listed = re.search(r"<!-- known words -->\n(.*?)\n<!-- /known words -->", shapes_doc, flags=re.DOTALL)
    assert listed and set(words_of(listed.group(1))) == known


def test_ci_runs_the_readmes_test_command_and_fails_with_it():
    """The one block not run here is run by `.ci/run`, word for word, and its failure fails CI."""
    (test_command,) = [block.code.strip() for block in BLOCKS if block.section == "Test it"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{test_command} || failed 1\n" in ci
    assert "set -euo pipefail" in ci
