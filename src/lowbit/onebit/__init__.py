"""lowbit.onebit: compress a pretrained LLM to about one bit per weight (OneBit, Xu et al. 2024).

- layer:      ``OneBitLinear`` y = LN(((x ⊙ g) · Sᵀ) ⊙ h) + bias; training form (latent weight, STE) and
              packed form (8 signs per byte), ``.pack()`` / ``.unpack()``
- svid:       ``svid(W, "nmf" | "svd") -> (signs, g, h)``, ``svid_error``
- convert:    ``convert_to_onebit(model, method, module_filter_fn)``; the 1-bit round-to-nearest baseline
- distill:    KD loss (logit KL + normalized hidden-state MSE) and ``distill`` on ``lowbit.trainer``
- synthetic:  teacher-generated distillation data, ``MixedBatcher``
- checkpoint: ``save_onebit`` / ``load_onebit`` (safetensors + JSON, atomic), ``size_report``
- evaluate:   sliding-window perplexity of a text, lm-evaluation-harness adapter
- compress:   the pipeline behind ``lowbit compress onebit`` (teacher, RTN, SVID, distilled: one table)
"""

from .checkpoint import (
    SizeReport,
    load_onebit,
    load_onebit_tokenizer,
    onebit_bits_per_weight,
    read_onebit_config,
    save_onebit,
    size_report,
)
from .convert import (
    ConvertedLayer,
    apply_rtn_binarization,
    cast_parameters,
    convert_to_onebit,
    onebit_layers,
    pack_onebit,
    select_linears,
    unpack_onebit,
)
from .distill import (
    TRAINABLE,
    DistillConfig,
    DistillLoss,
    TimeBudget,
    distill,
    find_blocks,
    forward_with_hidden,
    hidden_state_loss,
    logit_kl,
    set_trainable,
)
from .layer import OneBitLinear, onebit_linear, sign_ste
from .svid import SVID, rank1_nmf, rank1_svd, svid, svid_error
from .synthetic import MixedBatcher, SyntheticCorpus, generate_synthetic_corpus, load_synthetic_corpus

__all__ = [
    "SVID",
    "TRAINABLE",
    "ConvertedLayer",
    "DistillConfig",
    "DistillLoss",
    "MixedBatcher",
    "OneBitLinear",
    "SizeReport",
    "SyntheticCorpus",
    "TimeBudget",
    "apply_rtn_binarization",
    "cast_parameters",
    "convert_to_onebit",
    "distill",
    "find_blocks",
    "forward_with_hidden",
    "generate_synthetic_corpus",
    "hidden_state_loss",
    "load_onebit",
    "load_onebit_tokenizer",
    "load_synthetic_corpus",
    "logit_kl",
    "onebit_bits_per_weight",
    "onebit_layers",
    "onebit_linear",
    "pack_onebit",
    "rank1_nmf",
    "rank1_svd",
    "read_onebit_config",
    "save_onebit",
    "select_linears",
    "set_trainable",
    "sign_ste",
    "size_report",
    "svid",
    "svid_error",
    "unpack_onebit",
]
