"""A small GPT (decoder-only transformer) for demos, tests and benchmarks.

Pre-norm blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``; causal self-attention through
``F.scaled_dot_product_attention(is_causal=True)``; GELU MLP of width 4C; learned position
embedding; ``lm_head`` weight tied to the token embedding ``transformer.wte``. Every projection is
an ``nn.Linear`` so that `convert_to_int4_training` / `convert_to_onebit` can swap it.

Initialization (GPT-2): every Linear and Embedding weight ~ N(0, 0.02^2), biases 0, and the two
residual output projections (``attn.c_proj``, ``mlp.c_proj``) ~ N(0, (0.02 / sqrt(2 * n_layer))^2)
so that the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "NAMED_CONFIGS"]

INIT_STD = 0.02

# name -> (n_layer, n_head, n_embd, block_size)
NAMED_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 4, 128, 128),  # ~0.8M parameters + embeddings: a few hundred CPU steps in minutes
    "small": (6, 6, 384, 256),  # ~10.6M + embeddings
    "medium": (12, 12, 768, 1024),  # GPT-2 small body, ~85M + embeddings
    "350m": (24, 16, 1024, 1024),  # GPT-2 medium body, ~302M + embeddings
    "1.3b": (24, 16, 2048, 1024),  # GPT-3 XL body, ~1.21B + embeddings
}


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a `GPT`. Checked when built.

    Attributes:
        vocab_size: number of token ids, >= 1.
        n_layer: transformer blocks, >= 1.
        n_head: attention heads, >= 1; must divide ``n_embd``.
        n_embd: model width C.
        block_size: longest context (positions of the learned position embedding).
        dropout: in [0, 1); applied to embeddings, attention weights and residual branches while
            training.
        bias: whether Linear and LayerNorm layers have biases.
    """

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")

    @classmethod
    def named(cls, name: str, vocab_size: int, **overrides) -> GPTConfig:
        """The named size ("tiny", "small", "medium", "350m", "1.3b") for ``vocab_size`` tokens.

        ``overrides`` replace fields, e.g. ``GPTConfig.named("tiny", 65, block_size=64)``.
        """
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown GPT size {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        n_layer, n_head, n_embd, block_size = NAMED_CONFIGS[name]
        config = cls(
            vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size
        )
        return dataclasses.replace(config, **overrides) if overrides else config


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C) through a GELU hidden layer of width 4C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Modules: ``transformer.wte`` (token embedding, V x C), ``transformer.wpe`` (position
    embedding, block_size x C), ``transformer.drop``, ``transformer.h[i]`` (`Block`: ``ln_1``,
    ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), ``transformer.ln_f``
    and ``lm_head`` (nn.Linear C -> V without bias, weight tied to ``transformer.wte.weight``).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied head counted once); ``non_embedding`` leaves out ``wpe``
        and ``wte`` (whose weight is also the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and, with ``targets``, the mean cross-entropy.

        Args:
            idx: (B, T) token ids, torch.long (int32 accepted), 1 <= T <= block_size, on the
                model's device.
            targets: None or (B, T) integer ids; positions with target -1 are ignored in the loss.

        Returns:
            ``(logits, loss)``: logits (B, T, vocab_size) in the parameters' dtype; loss a float32
            scalar (mean over non-ignored positions) or None without targets.
        """
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a (B, T) tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.long, torch.int32):
            raise TypeError(f"idx must have dtype torch.long (or torch.int32), got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T < 1 or T > self.config.block_size:
            raise ValueError(
                f"sequence length T={T} must be in [1, block_size={self.config.block_size}]; "
                "crop the context (generate() does so)"
            )
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(
                    f"targets must be a tensor of the same shape as idx {tuple(idx.shape)}, got {got}"
                )
            if targets.dtype not in (torch.long, torch.int32):
                raise TypeError(f"targets must have dtype torch.long (or torch.int32), got {targets.dtype}")

        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T).long(), ignore_index=-1
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T0) and return (B, T0 + max_new_tokens).

        The context fed to the model is cropped to the last ``block_size`` tokens.
        ``temperature`` > 0 divides the logits; ``temperature == 0`` picks the argmax (greedy).
        ``top_k`` (>= 1) keeps only the k most likely tokens. ``generator`` (on the model's
        device) makes sampling reproducible. Does not switch train/eval mode: call ``.eval()``
        first when the model has dropout.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0 or math.isnan(temperature):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token per row to condition on")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id.to(idx.dtype)), dim=1)
        return idx
