"""The Order I projection of benchmarks/order1_cost.py: its arithmetic against hand-computed numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import order1_cost  # noqa: E402


def test_reads_follow_the_cache_budget():
    # 3 test sets of 10, 20, 30 images of 100 bytes, embeddings of 1 byte; a budget of 3100 bytes keeps the first
    # two sets (1000 + 2000 bytes) and every set's embeddings (60 bytes) but not the third set (3000 bytes)
    reads, untouched = order1_cost.full_reads([10, 20, 30], image_bytes=100, budget_bytes=3100, embedding_bytes=1)
    assert reads == 10 + 20 + 30 * (3 + 1)
    assert untouched == 60
    # no budget: every set read at every stage and before training (all but the first), embeddings as often
    reads, untouched = order1_cost.full_reads([10, 20, 30], image_bytes=100, budget_bytes=0, embedding_bytes=1)
    assert reads == untouched == 10 * 3 + 20 * 4 + 30 * 4


def test_projection_adds_up_its_parts():
    measured = order1_cost.Measured(train_s_per_step=0.1, task_overhead_s=3.0, ddas_s=2.0, ddas_steps=10,
                                    read_s_per_image=0.01, untouched_s_per_image=0.001, routed_s_per_image=0.002,
                                    routed_per_oracle=1.5, selection_s_per_image=0.0005, text_s=7.0,
                                    other_eval_s_per_image=0.0001)
    parts = order1_cost.project(measured, [10, 20], image_bytes=1, budget_bytes=1e9, embedding_bytes=1,
                                full_ddas_steps=100)
    assert parts["training"] == pytest.approx(2 * (1000 * 0.1 + 3.0))
    assert parts["DDAS fitting"] == pytest.approx(20.0)
    assert parts["reading test images"] == pytest.approx(30 * 0.01)
    assert parts["untouched encodings"] == pytest.approx(30 * 0.001)
    assert parts["routed encodings"] == pytest.approx((10 + 30) * 1.5 * 0.002)
    assert parts["DDAS selection"] == pytest.approx(30 * 2 * 0.0005)
    assert parts["text features"] == 7.0
    assert parts["scoring"] == pytest.approx(30 * 3 * 0.0001)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
