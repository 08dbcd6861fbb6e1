"""EMMA through transformers' own entry points: `pipeline(...)` tasks and every Auto class for multimodal generation."""

import json
import random
import textwrap

import pytest
import torch
import transformers
from builders import noise_image, run_python_without_emma_hf, tiny_chat_model
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, pipeline

from emma_hf import EmmaForConditionalGeneration
from emma_hf.hub import EXTRA_MODEL_AUTO_CLASSES, export_checkpoint
from emma_hf.shapes import random_scene, render
from emma_hf.shipped import shipped_model_path


QUESTIONS = [
    "what color is the circle?",
    "how many squares are there?",
    "is there a blue square?",
    "describe the image.",
]


def single_image_chats() -> list[list[dict]]:
    rng = random.Random(3)
    return [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": render(random_scene(rng, 96))}, {"type": "text", "text": q}],
            }
        ]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def chat_pipeline():
    return pipeline("image-text-to-text", model=str(shipped_model_path()))


def answers(outputs) -> list[str]:
    return [
        output[0]["generated_text"] if isinstance(output, list) else output["generated_text"] for output in outputs
    ]


def test_image_text_to_text_pipeline_batches_as_it_answers_one_by_one(chat_pipeline):
    """Left padding (the processor's default for generation) keeps a batch's answers equal to single calls."""
    chats = single_image_chats()
    kwargs = {"max_new_tokens": 12, "return_full_text": False}
    one_by_one = [answers(chat_pipeline(text=chat, **kwargs))[0] for chat in chats]
    batched = answers(chat_pipeline(text=chats, batch_size=4, **kwargs))
    assert batched == one_by_one
    assert one_by_one[1] in {"zero", "one", "two", "three", "four", "five"}, one_by_one


def chat_with_images(images: list, question: str) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def test_image_text_to_text_pipeline_batches_rows_with_any_number_of_images(chat_pipeline):
    """Rows with no, one and two images batch together: the processor's packed images concatenate across rows."""
    rng = random.Random(5)
    scenes = [render(random_scene(rng, 96)) for _ in range(4)]
    chats = [
        chat_with_images([scenes[0], scenes[1]], "how many squares are there?"),
        chat_with_images([], "what color is the circle?"),
        chat_with_images([scenes[2]], "what color is the circle?"),
        chat_with_images([scenes[3]], "how many squares are there?"),
    ]
    kwargs = {"max_new_tokens": 12, "return_full_text": False}
    one_by_one = [answers(chat_pipeline(text=chat, **kwargs))[0] for chat in chats]
    for batch_size in (2, 4):
        assert answers(chat_pipeline(text=chats, batch_size=batch_size, **kwargs)) == one_by_one
    assert one_by_one[2] in {"red", "green", "blue", "yellow", "purple", "orange"}, one_by_one


def test_image_text_to_text_pipeline_batches_images_of_different_sizes(exported):
    """Images of other sizes in each row (the tiny model resizes within a pixel budget, aspect kept)."""
    tiny_pipeline = pipeline("image-text-to-text", model=str(exported))
    sizes = [[(64, 96)], [(96, 32), (32, 32)], [], [(40, 40), (90, 60), (64, 64)]]
    chats = [
        chat_with_images([noise_image(height, width, seed) for seed, (height, width) in enumerate(row)], "a b c")
        for row in sizes
    ]
    grids = tiny_pipeline.processor.apply_chat_template(
        [message for chat in chats for message in chat], tokenize=True, return_dict=True, return_tensors="pt"
    )["image_grid_hw"]
    assert len({tuple(grid) for grid in grids.tolist()}) >= 4
    kwargs = {"max_new_tokens": 6, "return_full_text": False}
    one_by_one = [answers(tiny_pipeline(text=chat, **kwargs))[0] for chat in chats]
    assert answers(tiny_pipeline(text=chats, batch_size=4, **kwargs)) == one_by_one


def test_any_to_any_pipeline_answers_as_image_text_to_text(chat_pipeline):
    pytest.importorskip("torchvision", reason="transformers' any-to-any pipeline needs torchvision")
    if not hasattr(transformers, "AutoModelForMultimodalLM"):
        pytest.skip("this transformers release has no any-to-any pipeline")
    any_to_any = pipeline("any-to-any", model=str(shipped_model_path()))
    chat = single_image_chats()[0]
    kwargs = {"max_new_tokens": 8, "return_full_text": False}
    assert answers(any_to_any(text=chat, **kwargs)) == answers(chat_pipeline(text=chat, **kwargs))


def auto_classes() -> list[type]:
    classes = [AutoModelForImageTextToText, AutoModelForCausalLM]
    if hasattr(transformers, "AutoModelForMultimodalLM"):
        classes.append(transformers.AutoModelForMultimodalLM)
    return classes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, processor = tiny_chat_model(seed=0)
    return export_checkpoint(model, processor, tmp_path_factory.mktemp("tiny") / "tiny-emma")


@pytest.mark.parametrize("auto_class", auto_classes(), ids=lambda cls: cls.__name__)
def test_every_multimodal_auto_class_loads_emma(exported, auto_class):
    model = auto_class.from_pretrained(exported)
    assert type(model) is EmmaForConditionalGeneration
    config = json.loads((exported / "config.json").read_text())
    expected = config["auto_map"]["AutoModelForImageTextToText"]
    assert all(config["auto_map"][name] == expected for name in EXTRA_MODEL_AUTO_CLASSES)


REMOTE = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers

    folder = sys.argv[1]
    names = ["AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModelForMultimodalLM"]
    logits = {}
    for name in names:
        if hasattr(transformers, name):
            model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True)
            logits[name] = model(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1, :5].tolist()
    print(json.dumps({"logits": logits, "modules": sorted({type(model).__module__.split(".")[0]})}))
    """
)


def test_every_multimodal_auto_class_loads_the_remote_code(exported, tmp_path):
    remote = run_python_without_emma_hf(REMOTE, [str(exported)], tmp_path, tmp_path / "hf_home")
    assert remote["modules"] == ["transformers_modules"]
    expected = AutoModelForImageTextToText.from_pretrained(exported)(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(remote["logits"]) == len(auto_classes())
    for logits in remote["logits"].values():
        assert torch.allclose(torch.tensor(logits), expected.logits[0, -1, :5], atol=1e-5)
