import pytest
from builders import tiny_model

from emma_hf import EmmaForConditionalGeneration


@pytest.fixture
def model() -> EmmaForConditionalGeneration:
    return tiny_model()
