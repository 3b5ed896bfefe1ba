"""Benchmarks of continual methods: MTIL presets, experiments over methods, metrics and reports."""
