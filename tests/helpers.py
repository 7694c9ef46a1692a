"""Tiny offline building blocks shared by the tests: a byte-level tokenizer, random causal LMs, two-process
launchers, an aten op recorder and a recorder of what would make the host wait for a GPU."""

from __future__ import annotations

import multiprocessing
import functools
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _disable_module_memory_sharing,
    _GlobalStateSnapshot,
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PhimoeConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
)

import malora_lightning

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# A ChatML template like SmolLM2's, so the chat-template code path is exercised without a real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every byte is one token (vocab 256 + specials)."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(byte_alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
    return tokenizer


TINY_VOCAB = 272  # 256 bytes + 5 specials, rounded up


def tiny_config(family: str = "llama", vocab_size: int = TINY_VOCAB) -> PretrainedConfig:
    """A two-layer random config of a model family; big enough to have every projection type.

    initializer_range 0.2 instead of 0.02: with a frozen 32-wide output head at 0.02 the largest reachable logit gap
    is about 1, so no adapter could ever fit a target (the loss plateaus near log(vocab)).
    """
    config = _family_config(family, vocab_size)
    config.initializer_range = 0.2
    return config


def _family_config(family: str, vocab_size: int) -> PretrainedConfig:
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=1, eos_token_id=2)
    if family == "qwen2_moe":  # fused routed experts (3-D parameters) beside a shared expert of nn.Linear modules
        return Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                              shared_expert_intermediate_size=24)
    if family == "phimoe":  # its router is an nn.Linear subclass that returns the routing
        return PhimoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            num_local_experts=4, num_experts_per_tok=2)
    if family == "gemma3":  # multimodal (Gemma 3 4B and up): a vision tower beside the language model
        return Gemma3Config(text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, max_position_embeddings=128, sliding_window=16),
                            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8),
                            mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
                            image_token_index=vocab_size - 1)
    raise ValueError(f"unknown family {family!r}")


def activation_checkpointing_on(model: PreTrainedModel) -> bool:
    """transformers' `is_activation_checkpointing`; before its rename (our 5.18 floor) `is_gradient_checkpointing`,
    which now warns FutureWarning."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def tiny_model(family: str = "llama", seed: int = 0, layers: int | None = None) -> PreTrainedModel:
    """`layers`, when given, replaces the config's two decoder layers (a family whose config names them
    num_hidden_layers: not gemma3's, which nests its text config)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    if layers is not None:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def forkserver() -> multiprocessing.context.ForkServerContext:
    """multiprocessing's forkserver, which imports Lightning, transformers and the library once, when it starts (the
    first process it forks): a test's processes are forked from it instead of importing them afresh, as spawn's do.
    A process it forks has the server's environment, not the test's."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.test_module"])
    return context


class TwoProcessLauncher(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher, starting the ranks from a forkserver that has imported the tests'
    modules, and destroying the gloo process group once a rank's work is done, after every hook.

    Started by spawn, every rank imported Lightning, transformers and the library afresh: about 9 s of a 2-core
    machine per launch, most of a two-process test's time. `forkserver` (a single-threaded process holding those
    imports) forks each rank instead. The ranks are given what spawn gives them and a fork of the server does not:
    the launching process's random states (captured at launch) and environment (captured when the launcher is
    pickled for the ranks, after Lightning has chosen the port), and module tensors of their own rather than in
    shared memory.

    Left to interpreter exit, gloo's threads are torn down while still joinable and a rank now and then aborts
    after a successful fit ("terminate called without an active exception", SIGABRT; seen in CI in two of these
    tests). environment.md measured 2 aborts in 10 runs without an explicit destroy and none in 12 with one. Not in
    the strategy's `teardown`: Lightning calls it before `on_fit_end`, whose collectives (the adapter export under
    FSDP2) then found no process group.

    It also gives MASTER_PORT back as it found it: Lightning leaves the port it chose there, and every later run of
    the session, and the scripts the tests start, then listened on that one port (EADDRINUSE once another job held
    it)."""

    def __init__(self, strategy: DDPStrategy | ModelParallelStrategy) -> None:
        super().__init__(strategy, start_method="forkserver")

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        forkserver()
        previous = os.environ.get("MASTER_PORT")
        # held until the ranks have started: a tensor made while the launcher is pickled would be freed, closing its
        # shared-memory file, before the forkserver is handed that file
        self._launching_states = _GlobalStateSnapshot.capture()
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        finally:
            if previous is None:
                os.environ.pop("MASTER_PORT", None)
            else:
                os.environ["MASTER_PORT"] = previous

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_launching_environment": dict(os.environ)}

    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: L.Trainer) -> None:
        if isinstance(self._strategy, ModelParallelStrategy) and worker_output.weights_path is not None:
            # rank zero's FSDP2 shards (DTensors, which torch.load refuses with weights_only), not the model's
            # tensors: nothing this process's module could take
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)

    def _wrapping_function(self, process_idx, trainer, function, args, kwargs, return_queue) -> None:
        _adopt_environment(self._launching_environment)
        self._launching_states.restore()
        args, kwargs = _disable_module_memory_sharing((args, kwargs))
        try:
            super()._wrapping_function(process_idx, trainer, function, args, kwargs, return_queue)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _adopt_environment(environment: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environment)


class TwoProcessDDPStrategy(DDPStrategy):
    """DDP over 2 processes started by `TwoProcessLauncher`, as `strategy="ddp_spawn"` starts them but from the
    forkserver.

    Collectives time out after 2 minutes instead of gloo's 30: these tests take seconds, and a rank stuck in a
    collective then fails the test with gloo's error instead of stalling CI. (The hangs run-lowest once saw were not
    in a collective but in torch 2.7's `destroy_process_group`, which deadlocked on gloo's worker threads now and then;
    torch 2.8 fixed it and is our floor.)
    """

    def __init__(self) -> None:
        super().__init__(start_method="forkserver", timeout=timedelta(minutes=2))

    def _configure_launcher(self) -> None:
        self._launcher = TwoProcessLauncher(self)


class TwoProcessFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`ModelParallelStrategy`, data parallel over 2 processes unless told otherwise) started by
    `TwoProcessLauncher` (`ModelParallelStrategy` relaunches the command as a script, which a pytest run is not),
    with a short collective timeout: a rank stuck in a collective fails the test with gloo's error after a minute
    instead of stalling it."""

    def __init__(self, data_parallel_size: int | str = 2, tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, timeout=timedelta(minutes=1))

    def _configure_launcher(self) -> None:
        self._launcher = TwoProcessLauncher(self)


def run_ranks(function: Callable[..., None], *args: Any) -> None:
    """Runs `function(rank, *args)` on 2 processes forked from the forkserver, each with this process's environment,
    one thread, and a gloo process group joined before and destroyed after it (on a free port); a rank's exception
    is raised here, with its traceback. Collectives time out after 2 minutes, as `TwoProcessDDPStrategy`'s do: a rank
    stuck in one then fails instead of stalling the test."""
    forkserver()
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_network_port())}
    torch.multiprocessing.start_processes(_rank_in_process_group, args=(environment, function, args), nprocs=2,
                                          start_method="forkserver")


def _rank_in_process_group(rank: int, environment: dict[str, str], function: Callable[..., None],
                           args: tuple[Any, ...]) -> None:
    _adopt_environment(environment)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=2))
    try:
        function(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


# ops that read a tensor's value on the host or give a data-dependent shape; "[mask]": indexing by a boolean mask,
# whose nonzero runs inside the op, unseen by a dispatch mode
SYNCING_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.masked_select", "aten.unique",
               "aten._unique2", "aten.item", "aten.index[mask]", "aten.index_put[mask]"}


class OpRecorder(TorchDispatchMode):
    """The aten ops dispatched inside it, with how often each ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def ops(self) -> set[str]:
        return set(self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]):
            name = f"{name.rstrip('_')}[mask]"
        self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# what reads a tensor's values on the host, or gives a shape that depends on them: on a GPU each waits for every kernel
# queued before it (a host-device sync)
HOST_READS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
              torch.Tensor.__float__: "float", torch.Tensor.__int__: "int", torch.Tensor.__index__: "index",
              torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy", torch.Tensor.nonzero: "nonzero",
              torch.nonzero: "nonzero", torch.Tensor.unique: "unique", torch.unique: "unique",
              torch.Tensor.bincount: "bincount", torch.bincount: "bincount", torch.masked_select: "masked_select",
              torch.Tensor.masked_select: "masked_select"}
HOST_FACTORIES = (torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange)
PACKAGE_DIR = os.path.dirname(malora_lightning.__file__) + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class HostWaits(TorchFunctionMode):
    """What the code inside would make the host wait for on a GPU, counted on any device by (what, call site), the
    site being the innermost frame outside torch as "file.py:function" (its folder left out): reads of values
    (`HOST_READS`, indexing by a boolean mask) and blocking copies from the host (`torch.tensor` of Python data on a
    device, or a tensor a factory made without a device moved with `.to(device)` without non_blocking: PyTorch ends
    such a copy with a stream sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: Counter[tuple[str, str]] = Counter()

    def in_package(self) -> Counter[tuple[str, str]]:
        """The waits whose call site is in malora_lightning."""
        return Counter({key: count for key, count in self.waits.items() if key[1].startswith("malora_lightning/")})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = HOST_READS.get(func)
        if func is torch.Tensor.__getitem__ and any(isinstance(index, torch.Tensor) and index.dtype == torch.bool
                                                    for index in (args[1] if isinstance(args[1], tuple) else
                                                                  (args[1],))):
            what = "mask index"
        if func is torch.tensor and isinstance(kwargs.get("device"), torch.device):  # Python data onto the device
            what = "blocking copy from the host"
        if func is torch.Tensor.to and getattr(args[0], "_made_on_host", False):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, torch.device) and not kwargs.get("non_blocking", len(args) > 3 and args[3]):
                what = "blocking copy from the host"
        result = func(*args, **kwargs)
        if func in HOST_FACTORIES and kwargs.get("device") is None and isinstance(result, torch.Tensor):
            result._made_on_host = True
        if what is not None:
            self.waits[(what, _call_site())] += 1
        return result


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    where = "malora_lightning/" + path[len(PACKAGE_DIR):] if path.startswith(PACKAGE_DIR) else os.path.basename(path)
    return f"{where}:{frame.f_code.co_name}"


# torch.distributed's collectives: each a round trip between the ranks (the object collectives call these)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "reduce", "gather",
               "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")


@contextmanager
def counting_collectives() -> Iterator[Counter]:
    """Counts, by name, this process's calls of torch.distributed's collectives until it exits: those made through
    `torch.distributed` (Lightning's, torchmetrics') and those its object collectives make inside. A collective
    called again from inside one (a TorchFunctionMode such as `HostWaits` dispatches it anew) counts once."""
    counts: Counter = Counter()
    c10d = torch.distributed.distributed_c10d
    originals = [(namespace, name, getattr(namespace, name)) for name in COLLECTIVES
                 for namespace in (torch.distributed, c10d)]
    inside = [False]

    def counted(name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if inside[0]:
                return function(*args, **kwargs)
            counts[name] += 1
            inside[0] = True
            try:
                return function(*args, **kwargs)
            finally:
                inside[0] = False
        return wrapper

    for namespace, name, function in originals:
        setattr(namespace, name, counted(name, function))
    try:
        yield counts
    finally:
        for namespace, name, function in originals:
            setattr(namespace, name, function)


def record_sizes(monkeypatch, owner: type, name: str) -> list[int]:
    """Patch the method `owner.name` to record how many items its first argument holds at each call; the list."""
    original = getattr(owner, name)
    sizes: list[int] = []

    def recording(self, items, *args, **kwargs):
        sizes.append(len(items))
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return sizes
