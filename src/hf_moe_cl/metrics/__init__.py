"""`evaluate` metric modules shipped with hf-moe-cl; load one offline with `evaluate.load(hf_moe_cl.metrics.MTIL)`."""

from pathlib import Path

MTIL = str(Path(__file__).resolve().parent / "mtil")
"""The folder of the MTIL metric module (Transfer, Average, Last, BWT, drop per task)."""

__all__ = ["MTIL"]
