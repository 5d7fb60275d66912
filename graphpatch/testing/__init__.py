"""Test and developer tooling, shipped so that ``make demo``, ``graphpatch
coverage`` and the benchmarks work from an install: small model directories
(zoo, small_configs), the pretrained test checkpoint, local MLX ring groups
and the coverage table. The core never imports from here."""
