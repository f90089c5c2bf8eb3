"""The benchmark behind `mamba-adaptor-bench` / `python -m mamba_adaptor_ops.bench`."""
