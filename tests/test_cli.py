"""The `emma-hf` commands: what they print and write, their options, and how they explain what they cannot do."""

import argparse
import json
import random

import numpy as np
import PIL.Image
import pytest

from emma_hf.cli import main
from emma_hf.configuration_emma import EmmaConfig
from emma_hf.shapes import random_scene, render


def test_params_for_a_preset_and_a_saved_config(tmp_path, capsys):
    assert main(["params", "--preset", "emma-4b"]) == 0
    out = capsys.readouterr().out
    assert "decoder as the und stream sees it" in out and "4022.47M" in out and "312.25M" in out

    EmmaConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert main(["params", "--model", str(tmp_path)]) == 0
    assert f"EMMA {tmp_path}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    from builders import tiny_chat_model

    from emma_hf.hub import export_checkpoint

    model, processor = tiny_chat_model(seed=21)
    return export_checkpoint(model, processor, tmp_path_factory.mktemp("cli") / "emma-tiny")


def test_generate_edit_chat_and_demo_commands(exported_tiny, tmp_path, capsys):
    model = ["--model", str(exported_tiny)]
    drawing = ["--steps", "2", "--seed", "3"]
    assert (
        main(
            [
                "generate",
                "a red circle",
                "-o",
                str(tmp_path / "drawn.png"),
                "--height",
                "64",
                "--width",
                "96",
                *model,
                *drawing,
            ]
        )
        == 0
    )
    drawn = PIL.Image.open(tmp_path / "drawn.png")
    assert drawn.size == (96, 64)
    main(
        [
            "generate",
            "a red circle",
            "-o",
            str(tmp_path / "again.png"),
            "--height",
            "64",
            "--width",
            "96",
            *model,
            *drawing,
        ]
    )
    assert np.array_equal(np.asarray(drawn), np.asarray(PIL.Image.open(tmp_path / "again.png")))

    assert (
        main(
            ["edit", str(tmp_path / "drawn.png"), "make it blue", "-o", str(tmp_path / "edited.png"), *model, *drawing]
        )
        == 0
    )
    assert PIL.Image.open(tmp_path / "edited.png").size == (96, 64)

    capsys.readouterr()
    assert (
        main(
            [
                "chat",
                "--image",
                str(tmp_path / "drawn.png"),
                "what color is the circle?",
                "--max-new-tokens",
                "4",
                *model,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()

    assert main(["demo", "-o", str(tmp_path / "sheet.png"), *model, "--steps", "1"]) == 0
    sheet = PIL.Image.open(tmp_path / "sheet.png")
    assert sheet.width >= 5 * 96 and sheet.height >= 3 * 96


def test_eval_command_prints_every_row(exported_tiny, tmp_path, capsys):
    arguments = ["eval", "--model", str(exported_tiny), "--questions", "12", "--prompts", "10", "--edits", "10"]
    assert main([*arguments, "--steps", "1", "--json", str(tmp_path / "scores.json")]) == 0
    table = capsys.readouterr().out
    for row in ("single object", "relation", "describe", "replace", "overall (mean of kinds)"):
        assert row in table
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"understanding", "text_to_image", "edit"}
    assert all(0.0 <= rate <= 1.0 for task in scores.values() for rate in task.values() if rate == rate)


def test_every_option_has_help_with_its_default_and_there_is_a_version(capsys):
    from emma_hf.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        help_text = " ".join(command.format_help().split())
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:  # a flag: off unless given
                assert f"(default: {action.default})" in help_text, f"{name} {action.option_strings[0]}"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("emma-hf ")


def test_lora_option_applies_an_adapter_and_an_adapter_is_no_model(exported_tiny, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(exported_tiny)
    targets = r".*language_model\.layers\.\d+\.gen\..*(q_proj|v_proj)"
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    adapted.save_pretrained(tmp_path / "adapter")

    drawing = ["a red circle", "--model", str(exported_tiny), "--steps", "2", "--seed", "3"]
    main(["generate", *drawing, "-o", str(tmp_path / "plain.png")])
    main(["generate", *drawing, "-o", str(tmp_path / "adapted.png"), "--lora", str(tmp_path / "adapter")])
    plain, with_lora = (np.asarray(PIL.Image.open(tmp_path / f"{n}.png")) for n in ("plain", "adapted"))
    assert not np.array_equal(plain, with_lora)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "adapter")])
    assert exit_info.value.code == 1 and "holds a LoRA adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no folder" in capsys.readouterr().err


def test_chat_without_an_image_says_so(exported_tiny, capsys):
    assert main(["chat", "what color is the circle?", "--max-new-tokens", "2", "--model", str(exported_tiny)]) == 0
    assert "no --image given; the model answers from the question alone" in capsys.readouterr().err


def test_the_shipped_model_reads_any_case_and_explains_what_it_cannot_answer(tmp_path, capsys):
    scene = tmp_path / "scene.png"
    render(random_scene(random.Random(5), canvas=96)).save(scene)
    answers = []
    for question in ("how many circles are there?", "How many circles are there"):
        assert main(["chat", "--image", str(scene), question]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] == "two\n"

    for command in (["generate", "a cat", "-o", str(tmp_path / "x.png")], ["chat", "--image", str(scene), "Who?"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        captured = capsys.readouterr()
        assert exit_info.value.code == 1 and captured.out == "" and not (tmp_path / "x.png").exists()
        assert (
            "outside the words this checkpoint was trained on" in captured.err and "it knows: a above" in captured.err
        )

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--image", str(scene), "red?"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == ""  # no empty line for an empty answer
    assert "without an answer to 'red?'" in captured.err
