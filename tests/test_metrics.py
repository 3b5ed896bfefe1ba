import pytest

from hf_moe_cl.benchmark.metrics import average, class_incremental_metrics, last, mtil_metrics, transfer

MATRIX = [
    [10.0, 20.0, 30.0],
    [40.0, 50.0, 60.0],
    [70.0, 80.0, 90.0],
]


def test_mtil_metrics_match_a_hand_computed_matrix():
    # Transfer: column 2 -> A[0][1] = 20; column 3 -> (A[0][2] + A[1][2]) / 2 = 45; mean = 32.5
    assert transfer(MATRIX) == pytest.approx(32.5)
    # Average: column means 40, 50, 60 -> 50
    assert average(MATRIX) == pytest.approx(50.0)
    # Last: final row mean
    assert last(MATRIX) == pytest.approx(80.0)
    assert mtil_metrics(MATRIX) == {"transfer": 32.5, "average": 50.0, "last": 80.0}


def test_transfer_averages_columns_first_not_all_cells():
    matrix = [[0, 10, 100, 0], [0, 0, 50, 0], [0, 0, 0, 90], [0, 0, 0, 0]]
    # columns: [10], [100, 50], [0, 0, 90] -> 10, 75, 30 -> 38.333 (a cell mean would give 250 / 6 = 41.67)
    assert transfer(matrix) == pytest.approx((10 + 75 + 30) / 3)


def test_class_incremental_metrics():
    assert class_incremental_metrics([90.0, 80.0, 70.0]) == {"average": 80.0, "last": 70.0}
    with pytest.raises(ValueError):
        class_incremental_metrics([])


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        average([[1.0, 2.0]])
    with pytest.raises(ValueError, match="two tasks"):
        transfer([[1.0]])
