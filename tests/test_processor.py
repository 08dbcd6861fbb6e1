"""EmmaImageProcessor (sizes, modes, input kinds, errors) and EmmaProcessor (tokens, chat template, padding)."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from builders import images_of, noise_image, tiny_processor, tiny_tokenizer

from emma_hf import EmmaImageProcessor, EmmaProcessor
from emma_hf.processing_emma import EMMA_SPECIAL_TOKENS, UnknownWordsWarning, fit_to_token_grid


@pytest.mark.parametrize(
    "height, width", [(1, 1), (31, 33), (64, 64), (100, 60), (480, 640), (1000, 10), (10, 1000), (4000, 3000)]
)
@pytest.mark.parametrize("min_pixels, max_pixels", [(32 * 32, 96 * 96), (256 * 256, 1024 * 1024)])
def test_fit_to_token_grid_keeps_budget_grid_and_aspect(height, width, min_pixels, max_pixels):
    new_height, new_width = fit_to_token_grid(height, width, 32, min_pixels, max_pixels)
    assert new_height % 32 == 0 and new_width % 32 == 0 and new_height >= 32 and new_width >= 32
    assert new_height * new_width <= max_pixels
    tokens = new_height * new_width // 32**2
    assert tokens >= min(min_pixels // 32**2, max_pixels // 32**2) or min(new_height, new_width) == 32
    if min(height, width) >= 32 and max(height, width) / min(height, width) < 4:
        assert abs(np.log((new_height / new_width) / (height / width))) < 0.45


def test_native_sizes_within_budget_only_snap_to_the_grid():
    assert fit_to_token_grid(100, 60, 32, 32 * 32, 96 * 96) == (96, 64)
    assert fit_to_token_grid(512, 768, 32, 256 * 256, 1024 * 1024) == (512, 768)


@pytest.mark.parametrize("height, width", [(64, 64), (50, 90), (70, 40), (96, 96), (20, 300)])
def test_token_count_matches_the_resized_image(height, width):
    processor = tiny_processor()
    inputs = processor(text=["<|image_pad|>look"], images=[noise_image(height, width, 0)], return_tensors="pt")
    rows, cols = inputs["image_grid_hw"][0].tolist()
    assert fit_to_token_grid(height, width, 32, 32 * 32, 96 * 96) == (rows * 32, cols * 32)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == rows * cols
    assert inputs["pixel_values"].shape == inputs["vae_pixel_values"].shape == (rows * cols, 3 * 32 * 32)


def test_both_normalisations_come_from_the_same_resized_image():
    processor = EmmaImageProcessor(
        size={"height": 64, "width": 96}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    out = processor(noise_image(64, 96, 1), return_tensors="pt")
    unit = torch.from_numpy(np.asarray(noise_image(64, 96, 1), dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    torch.testing.assert_close(images_of(out, "pixel_values")[0], (unit - mean) / std)
    torch.testing.assert_close(images_of(out)[0], unit * 2 - 1)
    assert out["vae_pixel_values"].min() >= -1 and out["vae_pixel_values"].max() <= 1


def constant(mode: str, value, size=(40, 40)) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, value)


def palette_image(colour: list[int]) -> PIL.Image.Image:
    image = constant("P", 0)
    image.putpalette(colour * 256)
    return image


@pytest.mark.parametrize(
    "image, expected_rgb",
    [
        (constant("RGBA", (255, 0, 0, 0)), (255, 255, 255)),
        (constant("RGBA", (255, 0, 0, 255)), (255, 0, 0)),
        (constant("LA", (0, 0)), (255, 255, 255)),
        (constant("L", 128), (128, 128, 128)),
        (constant("1", 1), (255, 255, 255)),
        (palette_image([10, 200, 30]), (10, 200, 30)),
        (constant("CMYK", (0, 0, 0, 0)), (255, 255, 255)),
        (constant("I;16", 65535), (255, 255, 255)),
        (constant("I;16", 0), (0, 0, 0)),
        (constant("I", 32896), (128, 128, 128)),
    ],
    ids=["RGBA-clear", "RGBA-opaque", "LA-clear", "L", "1", "P", "CMYK", "I16-white", "I16-black", "I"],
)
def test_every_pil_mode_becomes_rgb(image, expected_rgb):
    out = tiny_processor().image_processor(image, return_tensors="pt")
    assert [image.shape for image in images_of(out)] == [(3, 32, 32)]
    expected = torch.tensor(expected_rgb, dtype=torch.float32) / 255 * 2 - 1
    torch.testing.assert_close(images_of(out)[0].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_palette_image_with_transparency_goes_on_white():
    image = palette_image([255, 0, 0])
    image.info["transparency"] = 0
    out = tiny_processor().image_processor(image, return_tensors="pt")
    assert torch.allclose(out["vae_pixel_values"], torch.ones(1))


def test_arrays_tensors_and_paths_give_the_same_pixels(tmp_path):
    image = noise_image(64, 96, 2)
    array = np.asarray(image)
    path = tmp_path / "image.png"
    image.save(path)
    processor = tiny_processor().image_processor
    reference = processor(image, return_tensors="pt")["vae_pixel_values"]
    for other in (
        array,
        array.astype(np.float32) / 255,
        torch.from_numpy(array.copy()).permute(2, 0, 1),
        torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255,
        torch.from_numpy(array.copy()).permute(2, 0, 1)[None],
        str(path),
        path,
    ):
        torch.testing.assert_close(processor(other, return_tensors="pt")["vae_pixel_values"], reference)


def test_greyscale_array_and_mixed_sizes_come_back_packed_a_row_per_token():
    processor = tiny_processor().image_processor
    grey, noise = np.full((64, 64), 255, dtype=np.uint8), noise_image(32, 96, 3)
    out = processor([grey, noise], return_tensors="pt")
    assert out["pixel_values"].shape == (2 * 2 + 1 * 3, 3 * 32 * 32)
    assert torch.equal(out["image_grid_hw"], torch.tensor([[2, 2], [1, 3]]))
    first, second = images_of(out)
    assert first.shape == (3, 64, 64) and torch.allclose(first, torch.ones(1))
    unit = torch.from_numpy(np.asarray(noise, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(second, unit * 2 - 1)
    # Token (0, 1) of the second image is its pixels [0:32, 32:64], channels first.
    torch.testing.assert_close(out["vae_pixel_values"][5], (unit[:, :, 32:64] * 2 - 1).reshape(-1))


def test_tiny_and_huge_images_are_resized_to_the_budget():
    processor = tiny_processor().image_processor
    assert processor(constant("RGB", (1, 2, 3), (1, 1)), return_tensors="pt")["image_grid_hw"].tolist() == [[1, 1]]
    huge = processor(constant("RGB", (9, 8, 7), (10000, 10000)), return_tensors="pt")
    assert [image.shape for image in images_of(huge)] == [(3, 96, 96)]


def test_bad_images_give_clear_errors(tmp_path):
    processor = tiny_processor().image_processor
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(str(missing))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="corrupt.png"):
        processor(corrupt)
    with pytest.raises(TypeError, match="PIL image, a numpy array, a torch tensor, a file path"):
        processor(42)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        processor(np.full((32, 32, 3), 2.0, dtype=np.float32))
    with pytest.raises(TypeError, match="int64"):
        processor(np.zeros((32, 32, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="C in 1, 3 or 4"):
        processor(np.zeros((32, 32, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        processor([])


def test_bad_size_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="multiples of patch_size=32"):
        EmmaImageProcessor(size={"height": 40, "width": 64})
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        EmmaImageProcessor(size={"min_pixels": 4096, "max_pixels": 1024})
    with pytest.raises(ValueError, match="do_resize=False"):
        EmmaImageProcessor(size={"height": 64, "width": 64}, do_resize=False)(noise_image(50, 50, 0))


def test_special_tokens_are_added_once_and_reported():
    tokenizer = tiny_tokenizer()
    base = len(tokenizer)
    processor = EmmaProcessor(EmmaImageProcessor(), tokenizer)
    assert len(tokenizer) == base + len(EMMA_SPECIAL_TOKENS)
    assert processor.emma_token_ids == {
        field: tokenizer.convert_tokens_to_ids(token) for field, token in EMMA_SPECIAL_TOKENS.items()
    }
    assert sorted(processor.emma_token_ids.values()) == list(range(base, base + len(EMMA_SPECIAL_TOKENS)))
    EmmaProcessor(EmmaImageProcessor(), tokenizer)
    assert len(tokenizer) == base + len(EMMA_SPECIAL_TOKENS)
    ids = tokenizer("<|vision_start|><|image_pad|><|vision_end|><|gen_start|>")["input_ids"]
    assert ids == [processor.emma_token_ids[f] for f in ("vision_start_token_id", "image_token_id")] + [
        processor.emma_token_ids["vision_end_token_id"],
        processor.emma_token_ids["gen_start_token_id"],
    ]


def test_chat_template_renders_qwen_turns_with_image_slots():
    processor = tiny_processor()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_each_image_expands_between_its_delimiters_and_batches_pad_left():
    processor = tiny_processor()
    ids = processor.emma_token_ids
    text = ["<|vision_start|><|image_pad|><|vision_end|>a<|vision_start|><|image_pad|><|vision_end|>", "hi"]
    inputs = processor(text=text, images=[noise_image(64, 64, 0), noise_image(32, 96, 1)], return_tensors="pt")
    row = inputs["input_ids"][0].tolist()
    first = row.index(ids["vision_start_token_id"])
    assert row[first + 1 : first + 5] == [ids["image_token_id"]] * 4 and row[first + 5] == ids["vision_end_token_id"]
    second = row.index(ids["vision_start_token_id"], first + 1)
    assert (
        row[second + 1 : second + 4] == [ids["image_token_id"]] * 3 and row[second + 4] == ids["vision_end_token_id"]
    )
    mask = inputs["attention_mask"][1]
    assert mask[0] == 0 and mask[-1] == 1 and bool((mask.diff() >= 0).all())


@pytest.mark.parametrize("num_placeholders, num_images", [(2, 1), (0, 1), (1, 2)])
def test_placeholder_image_mismatch_names_both_counts(num_placeholders, num_images):
    processor = tiny_processor()
    text = ["<|image_pad|>" * num_placeholders + "look"]
    with pytest.raises(ValueError, match=f"{num_placeholders} <\\|image_pad\\|> placeholders but {num_images} images"):
        processor(text=text, images=[noise_image(32, 32, i) for i in range(num_images)])
    if num_placeholders:
        with pytest.raises(ValueError, match=f"Found {num_placeholders} <\\|image_pad\\|> tokens"):
            processor(text=text)


def test_post_processing_decodes_without_special_tokens():
    processor = tiny_processor()
    ids = processor.tokenizer(["<|im_start|>The square is red.<|im_end|>"], return_tensors="pt")["input_ids"]
    assert processor.post_process_image_text_to_text(ids) == ["The square is red."]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["The square is red."]


def test_known_words_warn_about_other_words_and_survive_saving(tmp_path):
    processor = EmmaProcessor(
        EmmaImageProcessor(), tiny_tokenizer(), known_words=["what", "Color", "is", "the", "circle"]
    )
    assert processor.known_words == ["circle", "color", "is", "the", "what"]
    assert processor.unknown_words("What colour is THE circle, and the cat's colour?") == ["colour", "and", "cat", "s"]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the dog?"}]}]
    with pytest.warns(UnknownWordsWarning, match=r"'colour', 'dog' are outside the words .* it knows: circle color"):
        processor.apply_chat_template(chat, add_generation_prompt=True)
    with pytest.warns(UnknownWordsWarning, match="'a', 'cat'"):
        processor.generation_prompt("a cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor.apply_chat_template([[{"role": "user", "content": "What color is the circle?"}]])
        tiny_processor().apply_chat_template(chat)  # no known_words: any text

    processor.save_pretrained(tmp_path)
    assert EmmaProcessor.from_pretrained(tmp_path).known_words == processor.known_words
    assert EmmaProcessor.from_pretrained(tmp_path, known_words=None).known_words is None


def test_rescale_and_normalize_switches_apply_to_pixel_values_and_survive_saving(tmp_path):
    """As in every transformers image processor; the DC-AE's `vae_pixel_values` stay in [-1, 1] whatever is set."""
    image = noise_image(64, 64, seed=5)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    default = EmmaImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt")
    cases = {
        "do_normalize": ({"do_normalize": False}, pixels / 255),
        "do_rescale": ({"do_rescale": False}, (pixels - 0.5) / 0.5),
        "rescale_factor": ({"rescale_factor": 1 / 510}, (pixels / 510 - 0.5) / 0.5),
    }
    for name, (setting, expected) in cases.items():
        processor = EmmaImageProcessor(size={"height": 64, "width": 64}, **setting)
        processor.save_pretrained(tmp_path / name)
        reloaded = EmmaImageProcessor.from_pretrained(tmp_path / name)
        for each in (processor, reloaded):
            output = each(image, return_tensors="pt")
            assert torch.allclose(images_of(output, "pixel_values")[0], expected, atol=1e-5), name
            assert torch.equal(output["vae_pixel_values"], default["vae_pixel_values"]), name
        as_call_argument = EmmaImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt", **setting)
        assert torch.allclose(images_of(as_call_argument, "pixel_values")[0], expected, atol=1e-5), name


def test_the_tokenizer_pads_on_the_left_for_generation_also_after_saving(tmp_path):
    """transformers' pipelines pad batches with the tokenizer's own side (5.23 does not switch it to left)."""
    processor = tiny_processor()
    assert processor.tokenizer.padding_side == "left"
    processor.save_pretrained(tmp_path)
    reloaded = EmmaProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer.padding_side == "left"
    padded = reloaded.tokenizer(["a", "a red square"], padding=True)["attention_mask"]
    assert padded[0][0] == 0 and padded[0][-1] == 1
