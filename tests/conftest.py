import os

# Tests never touch the network; set before transformers/datasets are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny-model tests run fastest on one thread, and a second thread per process oversubscribes the 2-core CI machine
# as soon as a test spawns processes (measured: 0.7 s vs 8 ms per tiny backward on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# The fused-routing tests run the Triton kernels through Triton's interpreter on every machine, GPU or not: they
# build their layers on the CPU, whose tensors compiled kernels cannot read (the GPU suite's probe, benchmarks/
# gpu_suite.py, runs them compiled on CUDA). It has to be chosen before triton is first imported (Lightning does).
os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random two-layer Llama saved with a ChatML byte-level tokenizer: a stand-in for a hub model folder."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer(chat_template=True).save_pretrained(path)
    return path
