"""ERNIE-4.5 architecture config, read strictly from a checkpoint's config.json.

One dataclass for the dense (``ernie4_5``) and MoE (``ernie4_5_moe``) models. Keys whose defaults
differ between transformers and Paddle (``tie_word_embeddings``; ``moe_layer_start_index`` and
``moe_layer_interval`` for MoE) must be present: a missing one raises :class:`ConfigError` naming
it. Paddle-only extras (``fuse_*``, ``use_rmsnorm``, ``compression_ratio`` ...) are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import torch

from native.kv_cache import DTYPES
from pdbus.config import ConfigError  # config.json is missing a required key or holds an unsupported value

DENSE_TYPE = "ernie4_5"
MOE_TYPE = "ernie4_5_moe"
ARCHITECTURES = {"Ernie4_5ForCausalLM": DENSE_TYPE, "Ernie4_5_MoeForCausalLM": MOE_TYPE}


def _require(d: dict, key: str, why: str = ""):
    if key not in d or d[key] is None:
        extra = f" ({why})" if why else ""
        raise ConfigError(f"config.json: missing required key {key!r}{extra}")
    return d[key]


def _eos(value) -> int | tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


@dataclass(frozen=True)
class ErnieConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"
    # MoE (zero / unused for the dense model)
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = 0
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in (DENSE_TYPE, MOE_TYPE):
            raise ConfigError(f"config.json: unsupported model_type {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.use_bias:
            raise ConfigError("config.json: use_bias=true is not supported (no released model uses it)")
        if self.is_moe:
            if self.moe_num_experts <= 0 or not 0 < self.moe_k <= self.moe_num_experts:
                raise ConfigError(
                    f"config.json: bad moe_num_experts/moe_k {self.moe_num_experts}/{self.moe_k}"
                )
            if self.moe_layer_interval <= 0:
                raise ConfigError(f"config.json: bad moe_layer_interval {self.moe_layer_interval}")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"config.json: unsupported torch_dtype {self.torch_dtype!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> ErnieConfig:
        model_type = d.get("model_type")
        if model_type not in (DENSE_TYPE, MOE_TYPE):
            archs = d.get("architectures") or []
            known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
            if not known:
                raise ConfigError(
                    f"config.json: not an ERNIE-4.5 text model (model_type={model_type!r}, "
                    f"architectures={archs!r})"
                )
            model_type = known[0]
        is_moe = model_type == MOE_TYPE
        hidden = int(_require(d, "hidden_size"))
        heads = int(_require(d, "num_attention_heads"))
        layers = int(_require(d, "num_hidden_layers"))
        head_dim = d.get("head_dim")
        head_dim = int(head_dim) if head_dim is not None else hidden // heads
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"config.json: unsupported rope_type {rope.get('rope_type')!r}")
            rope_theta = rope.get("rope_theta", 500000.0)
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        kw: dict = dict(
            model_type=model_type,
            vocab_size=int(_require(d, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_require(d, "intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            tie_word_embeddings=bool(
                _require(d, "tie_word_embeddings", "transformers defaults it to true, Paddle to false")
            ),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            use_bias=bool(d.get("use_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            bos_token_id=int(d.get("bos_token_id", 1)),
            eos_token_id=_eos(d.get("eos_token_id", 2)),
            pad_token_id=int(d.get("pad_token_id") or 0),
            torch_dtype=str(dtype),
            name=name,
        )
        if is_moe:
            paddle_vs_hf = "transformers and Paddle default it differently"
            end = d.get("moe_layer_end_index")
            end = layers - 1 if end is None or int(end) < 0 else int(end)
            kw.update(
                moe_num_experts=int(_require(d, "moe_num_experts")),
                moe_k=int(_require(d, "moe_k")),
                moe_intermediate_size=int(_require(d, "moe_intermediate_size")),
                moe_num_shared_experts=int(d.get("moe_num_shared_experts") or 0),
                moe_layer_start_index=int(_require(d, "moe_layer_start_index", paddle_vs_hf)),
                moe_layer_end_index=end,
                moe_layer_interval=int(_require(d, "moe_layer_interval", paddle_vs_hf)),
                moe_norm_min=float(d.get("moe_norm_min", 1e-12)),
            )
        return cls(**kw)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> ErnieConfig:
        cfg_path = os.path.join(os.fspath(path), "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{cfg_path}: not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from None
        return cls.from_dict(d, name=os.path.basename(os.path.normpath(os.fspath(path))))

    # ------------------------------------------------------------------ queries
    @property
    def is_moe(self) -> bool:
        return self.model_type == MOE_TYPE

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    def to_dict(self) -> dict:
        """A transformers-style config.json for this architecture (used by the exporters)."""
        arch = next(a for a, t in ARCHITECTURES.items() if t == self.model_type)
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "use_bias": self.use_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.is_moe:
            d.update(
                moe_num_experts=self.moe_num_experts,
                moe_k=self.moe_k,
                moe_intermediate_size=self.moe_intermediate_size,
                moe_num_shared_experts=self.moe_num_shared_experts,
                moe_layer_start_index=self.moe_layer_start_index,
                moe_layer_end_index=self.moe_layer_end_index,
                moe_layer_interval=self.moe_layer_interval,
                moe_norm_min=self.moe_norm_min,
            )
        return d

    def config_hash(self) -> str:
        """Short sha256 over the architecture-relevant fields (not name, not dtype)."""
        d = asdict(self)
        d.pop("name")
        d.pop("torch_dtype")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
            d.pop(k)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
