"""
The shipped folder and a fresh export of it, used the Hub way in a process that cannot import `emma_hf`: chat
through `AutoModelForImageTextToText` / `AutoProcessor`, text-to-image and an edit through
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`. Remote code runs inside whatever transformers the
user has, so CI runs this on the newest releases and on the floors alike.
"""

import hashlib
import json
import random
import textwrap

import torch
import transformers
from builders import run_python_without_emma_hf
from transformers import AutoModelForImageTextToText, AutoProcessor

from emma_hf.pipeline_emma import EmmaPipeline
from emma_hf.shapes import random_scene, render
from emma_hf.shipped import shipped_model_path


QUESTION = "what color is the circle?"
PROMPT = "a red circle above a blue square"
EDIT = "make the red circle green"
STEPS = 4

REMOTE = textwrap.dedent(
    """
    import hashlib, json, sys
    import PIL.Image
    import torch
    import transformers
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, image_path, question, prompt, edit, steps = sys.argv[1:7]
    image = PIL.Image.open(image_path).convert("RGB")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    answers = [
        model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=use_cache)[0, inputs["input_ids"].shape[1]:]
        for use_cache in (True, False)
    ]

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe(prompt, num_inference_steps=int(steps), generator=torch.Generator().manual_seed(0), output_type="pt")
    edited = pipe(edit, image=image, num_inference_steps=int(steps), generator=torch.Generator().manual_seed(0),
                  output_type="pt")
    print(json.dumps({
        "transformers": transformers.__version__,
        "emma_hf_importable": emma_hf_importable(),
        "modules": [type(model).__module__, type(processor).__module__, type(pipe).__module__],
        "answer": processor.decode(answers[0], skip_special_tokens=True),
        "cached_equals_uncached": bool(torch.equal(answers[0], answers[1])),
        "drawn": hashlib.sha256(drawn.images.float().numpy().tobytes()).hexdigest(),
        "edited": hashlib.sha256(edited.images.float().numpy().tobytes()).hexdigest(),
    }))
    """
)


def expected_results(folder, image) -> dict:
    """What the installed package gives on the same folder."""
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    pipe = EmmaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": STEPS, "output_type": "pt"}
    drawn = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **common).images
    edited = pipe(EDIT, image=image, generator=torch.Generator().manual_seed(0), **common).images
    return {
        "answer": processor.decode(answer, skip_special_tokens=True),
        "drawn": hashlib.sha256(drawn.float().numpy().tobytes()).hexdigest(),
        "edited": hashlib.sha256(edited.float().numpy().tobytes()).hexdigest(),
    }


def test_chat_drawing_and_editing_through_remote_code_without_emma_hf(tmp_path):
    folder = tmp_path / "shapes-emma"
    EmmaPipeline.from_pretrained(str(shipped_model_path())).save_pretrained(folder)
    image = render(random_scene(random.Random(3), canvas=96))
    image_path = tmp_path / "scene.png"
    image.save(image_path)
    arguments = [str(folder), str(image_path), QUESTION, PROMPT, EDIT, str(STEPS)]
    remote = run_python_without_emma_hf(REMOTE, arguments, tmp_path, tmp_path / "hf_home")

    assert remote["emma_hf_importable"] is False and remote["transformers"] == transformers.__version__
    assert all(module.startswith(("transformers_modules.", "diffusers_modules.")) for module in remote["modules"])
    assert remote["cached_equals_uncached"]
    assert remote["answer"].strip()
    expected = expected_results(folder, image)
    assert {key: remote[key] for key in expected} == expected, json.dumps(remote)
