"""`emma-hf params` prints the component sizes of a preset or a saved config."""

from emma_hf.cli import main
from emma_hf.configuration_emma import EmmaConfig


def test_params_for_a_preset_and_a_saved_config(tmp_path, capsys):
    assert main(["params", "--preset", "emma-4b"]) == 0
    out = capsys.readouterr().out
    assert "decoder as the und stream sees it" in out and "4022.47M" in out and "312.25M" in out

    EmmaConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert main(["params", "--model", str(tmp_path)]) == 0
    assert f"EMMA {tmp_path}" in capsys.readouterr().out
