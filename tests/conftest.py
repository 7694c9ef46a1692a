import os

# Tests never touch the network; set before transformers/datasets are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.helpers import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return tiny_tokenizer(chat_template=True)


@pytest.fixture
def llama():
    return tiny_model("llama")
