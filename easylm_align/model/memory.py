"""Per-device memory of a compiled XLA executable, from the compiler's own analysis.

`memory_analysis()` describes one device's partitioned program: arguments (parameters, state,
batch), outputs, temporaries (activations, gradients, workspace), and the bytes that donated
arguments share with outputs. The CPU compiler's figures are an estimate for other backends: TPU
and GPU compilers schedule and fuse differently.
"""

from __future__ import annotations

from typing import Any

_GIB = float(1 << 30)


def compiled_memory_gib(compiled: Any, with_peak: bool = False) -> dict[str, float]:
    """{arguments, outputs, temporaries, aliased, total[, peak]} in GiB; total counts aliased bytes once.

    `with_peak` (for XLA's TPU compiler): `peak` is the most the scheduled program holds at once,
    with the compiler's own scratch, the figure it checks against the device's memory; `total` adds
    up the buffers as if all were live together. (The CPU compiler's `peak` counts arguments only.)
    """
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend's compiler reports no memory analysis")
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temporaries, aliased = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    total = arguments + outputs - aliased + temporaries
    figures = [("arguments", arguments), ("outputs", outputs), ("temporaries", temporaries), ("aliased", aliased),
               ("total", total)]
    if with_peak:
        figures.append(("peak", stats.peak_memory_in_bytes))
    return {name: round(value / _GIB, 3) for name, value in figures}
