"""README blocks run as printed, and what they print is what the README says."""

import os
import re
import subprocess
import sys
from pathlib import Path

from emma_hf import shipped_model_path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README text under `## title`, up to the next heading of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def run_shell(block: str, cwd: Path) -> str:
    """Run a README shell block with this interpreter's scripts (`python`, `emma-hf`) first on PATH, offline."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_the_fine_tuning_quickstart_prints_the_scores_in_the_readme(tmp_path):
    """The block runs from a tree laid out as the repository (the recipe's paths are relative to it)."""
    text = section("Fine-tune it")
    (block,) = code_blocks(text, "bash")
    recipe = tmp_path / "examples" / "shapes" / "lora-quickstart.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text((ROOT / "examples" / "shapes" / "lora-quickstart.yaml").read_text())
    shipped = tmp_path / "src" / "emma_hf" / "shipped" / "shapes-emma"
    shipped.parent.mkdir(parents=True)
    shipped.symlink_to(shipped_model_path(), target_is_directory=True)

    printed = run_shell(block, tmp_path)
    scores = dict(re.findall(r"^\| (\w+) \| overall \(mean of kinds\) \| ([\d.]+) \|", printed, flags=re.MULTILINE))
    documented = re.findall(r"^\| ([\w-]+) \(\d+ \w+\) \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.MULTILINE)
    tasks = {"understanding": "understanding", "text-to-image": "text_to_image", "editing": "edit"}
    assert {tasks[name]: with_lora for name, _, with_lora in documented} == scores
    assert (tmp_path / "runs" / "shapes-lora" / "final" / "adapter_model.safetensors").is_file()
