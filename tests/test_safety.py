"""
Safe loading: emma_hf never evaluates text or unpickles by itself, an exported checkpoint's remote code is EMMA's
four files and nothing else, and a pickle checkpoint loads only when the caller opts in.
"""

import ast
import json
from pathlib import Path

import pytest
import torch
from builders import tiny_chat_model, tiny_model

import emma_hf
from emma_hf import EmmaForConditionalGeneration
from emma_hf.hub import export_checkpoint


PACKAGE = Path(emma_hf.__file__).parent
REMOTE_CODE = {"configuration_emma.py", "modeling_emma.py", "processing_emma.py", "pipeline_emma.py"}


def unsafe_calls(source: str) -> list[str]:
    """Calls that run text as code or unpickle: eval/exec, pickle and yaml loaders, torch.load without weights_only."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in {"eval", "exec", "compile", "__import__"} or name.startswith(("pickle.", "marshal.", "dill.")):
            found.append(name)
        elif name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"}:
            found.append(name)
        elif name == "torch.load" and not any(
            keyword.arg == "weights_only" and ast.unparse(keyword.value) == "True" for keyword in node.keywords
        ):
            found.append(f"{name} without weights_only=True")
    return found


def test_the_scanner_finds_unsafe_calls():
    source = "eval(x)\nexec(y)\npickle.loads(b)\nyaml.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=True)\n"
    assert unsafe_calls(source) == [
        "eval",
        "exec",
        "pickle.loads",
        "yaml.load",
        "torch.load without weights_only=True",
    ]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_source_file_evaluates_text_or_unpickles(path: Path):
    assert unsafe_calls(path.read_text()) == []


def python_files(folder: Path) -> dict[str, set[str]]:
    return {
        str(sub.relative_to(folder)): {path.name for path in sub.glob("*.py")}
        for sub in (folder, folder / "model", folder / "processor", folder / "scheduler")
    }


def test_an_exported_checkpoint_runs_only_emmas_four_code_files(tmp_path: Path):
    folder = export_checkpoint(*tiny_chat_model(), tmp_path / "emma")
    assert python_files(folder) == {
        ".": REMOTE_CODE,
        "model": {"modeling_emma.py"},
        "processor": {"processing_emma.py"},
        "scheduler": set(),
    }
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    model_index = json.loads((folder / "model_index.json").read_text())
    modules = {reference.split(".")[0] for reference in auto_map.values()}
    modules |= {value[0] for value in model_index.values() if isinstance(value, list) and value[0] != "diffusers"}
    assert {f"{module}.py" for module in modules} <= REMOTE_CODE
    for name in REMOTE_CODE:
        assert unsafe_calls((folder / name).read_text()) == []


def test_a_pickle_checkpoint_loads_only_when_asked_for(tmp_path: Path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="use_safetensors=False"):
        EmmaForConditionalGeneration.from_pretrained(tmp_path)
    loaded = EmmaForConditionalGeneration.from_pretrained(tmp_path, use_safetensors=False)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
