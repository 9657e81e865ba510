"""lowbit.inspect: quantization diagnostics of a model's linear layers.

- stats:   pure statistics (absmax, kurtosis, outlier channels, SQNR of INT8/INT4 with and without the
           Hadamard rotation), mergeable accumulators
- collect: hooks on every nn.Linear (and ReLU / sigmoid / tanh), run a few batches
- report:  ranked table, one-line recommendations, PNG histograms and SQNR bars, JSON

``inspect_model(model, batches, out_dir=...)`` does all three; ``lowbit inspect`` is its command line.
"""

from .collect import (
    ActivationStats,
    Collected,
    InspectSettings,
    LinearStats,
    capture_input,
    collect_stats,
    variant_key,
)
from .report import (
    ActivationReport,
    InspectReport,
    LayerReport,
    build_report,
    format_table,
    inspect_model,
    plot_histograms,
    plot_sqnr,
    write_report,
)
from .stats import (
    Moments,
    SqnrSum,
    can_rotate,
    fake_quant,
    kurtosis,
    outlier_channel_share,
    quantized_matmul,
    rotate,
    sqnr_db,
)

__all__ = [
    "ActivationReport",
    "ActivationStats",
    "Collected",
    "InspectReport",
    "InspectSettings",
    "LayerReport",
    "LinearStats",
    "Moments",
    "SqnrSum",
    "build_report",
    "can_rotate",
    "capture_input",
    "collect_stats",
    "fake_quant",
    "format_table",
    "inspect_model",
    "kurtosis",
    "outlier_channel_share",
    "plot_histograms",
    "plot_sqnr",
    "quantized_matmul",
    "rotate",
    "sqnr_db",
    "variant_key",
    "write_report",
]
