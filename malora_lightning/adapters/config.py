"""`AdapterConfig`: one dataclass describing LoRA, MoLoRA and MALoRA adapters, validated and JSON round-trippable."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from malora_lightning.dtypes import dtypes_named
from malora_lightning.values import is_finite_number, is_int

Method = Literal["lora", "molora", "malora"]
Kernel = Literal["dense", "fused", "sparse"]

METHODS: tuple[str, ...] = ("lora", "molora", "malora")
KERNELS: tuple[str, ...] = ("dense", "fused", "sparse")
ADAPTER_DTYPES: dict[str, torch.dtype] = dtypes_named("float32", "bfloat16", "float16", "float64")

# The paper adapts every projection except the attention output (o_proj); its parameter counts confirm this.
PAPER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """What to inject and how. Defaults are the paper's MALoRA setting (Table 8: N=8, top-2, r-bar=12, d=32, scale 2).

    Attributes:
        method: "lora", "molora" (N LoRA experts, top-k routed) or "malora" (shared S_A, per-expert P_t and B_t).
        rank: LoRA rank r; for mixtures the per-expert rank (r for MoLoRA, r-bar for MALoRA).
        shared_rank: d, the rank of MALoRA's shared subspace S_A (MALoRA only; must be >= rank).
        alpha: scaling numerator; the adapter output is multiplied by alpha / rank. None means 2 * rank
            (scale 2, which every method in the paper uses).
        dropout: dropout on the adapter input (before A or S_A), shared by all experts.
        num_experts: N, experts per adapted linear (mixtures only).
        top_k: experts kept per token (mixtures only).
        beta: MALoRA's weight-balance scale: S_A = beta * V_0 and P_t = (U_t Sigma_t)[:r-bar] / beta.
        aux_loss_coef: weight of the Switch/Mixtral load-balance loss (averaged over routed layers). The loss is 1
            at perfect balance (f_e counts each top-k slot as 1/K); MixLoRA/MoE-PEFT's equals K there, so their
            coefficient c is K * c here.
        router_z_loss_coef: weight of the router z-loss (mean logsumexp(logits)^2); 0 disables it.
        renormalize_top_k: divide the kept top-k probabilities by their sum (MixLoRA/FastMoE); False keeps the raw
            softmax values (a literal reading of the paper's Eq. 4).
        router_init_std: routers start as N(0, router_init_std).
        target_modules: module names or suffixes (a list), a full-match regex (a string), or "all-linear"
            (every linear layer except the output head). An MoE layer's router or gate is never adapted.
        exclude_modules: names/suffixes (list) or regex (string) never adapted, even when targeted.
        layers_to_transform: only adapt modules in these decoder layer indices (None: all).
        train_shared_A: MALoRA ablation switch; False freezes S_A at its initialisation (paper Table 3).
        train_P: MALoRA ablation switch; False freezes every P_t.
        train_A: LoRA/MoLoRA ablation switch; False freezes A (AsyLoRA, MoAsyLoRA).
        reuse_first_kaiming: MALoRA init; True derives expert 1's P from K_0 (the matrix that gives S_A) instead of
            drawing N+1 matrices (paper ambiguity 2; it makes no material difference).
        adapter_dtype: dtype of the adapter parameters, whatever the base's dtype ("float32" by default: AdamW on
            bf16 weights loses small updates).
        kernel: "dense" computes every expert with zero gates for the unselected ones (fastest measured on CPU for
            N*r-bar this small); "fused" is "dense" with its routing fused into two Triton kernels on CUDA devices
            (fewer launches; elsewhere it runs as "dense"); "sparse" dispatches tokens to their top-k experts
            (MALoRA moves d-dim rows).
    """

    method: Method = "malora"
    rank: int = 12
    shared_rank: int | None = 32
    alpha: float | None = None
    dropout: float = 0.05
    num_experts: int = 8
    top_k: int = 2
    beta: float = 1.0
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    renormalize_top_k: bool = True
    router_init_std: float = 0.02
    target_modules: list[str] | str = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    train_shared_A: bool = True
    train_P: bool = True
    train_A: bool = True
    reuse_first_kaiming: bool = False
    adapter_dtype: str = "float32"
    kernel: Kernel = "dense"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def scaling(self) -> float:
        alpha = 2.0 * self.rank if self.alpha is None else self.alpha
        return alpha / self.rank

    @property
    def is_routed(self) -> bool:
        return self.method in ("molora", "malora")

    @property
    def torch_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.adapter_dtype]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` naming the field, its value and what would be valid."""
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(is_int(self.rank) and self.rank > 0, "rank", self.rank, "an integer >= 1")
        _check(self.alpha is None or (is_finite_number(self.alpha) and self.alpha > 0), "alpha", self.alpha,
               "a finite number > 0, or None for 2 * rank")
        _check(is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a float in [0, 1)")
        _check(self.adapter_dtype in ADAPTER_DTYPES, "adapter_dtype", self.adapter_dtype,
               f"one of {tuple(ADAPTER_DTYPES)}")
        _check(self.kernel in KERNELS, "kernel", self.kernel, f"one of {KERNELS}")
        for name in ("renormalize_top_k", "train_shared_A", "train_P", "train_A", "reuse_first_kaiming"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _check(is_finite_number(self.aux_loss_coef) and self.aux_loss_coef >= 0, "aux_loss_coef", self.aux_loss_coef,
               "a finite number >= 0")
        _check(is_finite_number(self.router_z_loss_coef) and self.router_z_loss_coef >= 0, "router_z_loss_coef",
               self.router_z_loss_coef, "a finite number >= 0")
        _check(is_finite_number(self.router_init_std) and self.router_init_std >= 0, "router_init_std",
               self.router_init_std, "a finite number >= 0")
        _check(isinstance(self.target_modules, str) and self.target_modules != ""
               or isinstance(self.target_modules, list) and len(self.target_modules) > 0
               and all(isinstance(t, str) and t for t in self.target_modules),
               "target_modules", self.target_modules,
               "a non-empty list of module names/suffixes, a regex string, or 'all-linear'")
        # an empty name or regex matches no module: [""] excluded nothing without a word
        _check(self.exclude_modules is None or isinstance(self.exclude_modules, str) and self.exclude_modules != ""
               or isinstance(self.exclude_modules, list) and all(isinstance(t, str) and t for t in self.exclude_modules),
               "exclude_modules", self.exclude_modules,
               "None, a list of module names/suffixes, or a regex string, none of them empty")
        for name in ("target_modules", "exclude_modules"):
            pattern = getattr(self, name)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"AdapterConfig.{name}={pattern!r} is invalid: a string is a regular expression "
                                     f"and this one does not compile ({error}); a list names modules") from None
        # an empty list selects no module: inject_adapters refused it only once the base model had loaded
        _check(self.layers_to_transform is None
               or isinstance(self.layers_to_transform, list) and len(self.layers_to_transform) > 0
               and all(is_int(i) and i >= 0 for i in self.layers_to_transform),
               "layers_to_transform", self.layers_to_transform,
               "None (every layer) or a non-empty list of layer indices >= 0")
        if self.is_routed:
            _check(is_int(self.num_experts) and self.num_experts >= 1, "num_experts", self.num_experts,
                   "an integer >= 1")
            _check(is_int(self.top_k) and 1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
                   f"an integer in [1, num_experts={self.num_experts}]")
        if self.method == "malora":
            _check(is_int(self.shared_rank) and self.shared_rank >= 1, "shared_rank", self.shared_rank,
                   "an integer >= 1 (d, the rank of the shared subspace S_A)")
            _check(self.rank <= self.shared_rank, "rank", self.rank,
                   f"an integer in [1, shared_rank={self.shared_rank}] for MALoRA (rank(B_t P_t S_A) <= d)")
            _check(is_finite_number(self.beta) and self.beta > 0, "beta", self.beta, "a finite number > 0")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        if not isinstance(data, dict):
            raise ValueError(f"AdapterConfig: expected an object of fields (a dict, a JSON object), found "
                             f"{type(data).__name__} {data!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        with config_read_from(str(path)):
            try:
                return cls.from_json(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale
            except json.JSONDecodeError as error:
                raise ValueError(f"not valid JSON ({error})") from error


@contextlib.contextmanager
def config_read_from(source: str) -> Iterator[None]:
    """Name `source` (a file, a header entry) in the error of an adapter config that cannot be built from it:
    `AdapterConfig`'s own errors (an invalid or unknown field, JSON that is not an object) name no file."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: {error}") from error


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"AdapterConfig.{name}={value!r} is invalid: expected {allowed}")
