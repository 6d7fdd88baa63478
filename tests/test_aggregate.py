"""Across-seed aggregation: IQM and stratified bootstrap intervals, CSV logs to report."""
import json

import numpy as np
import pytest

pytest.importorskip("rliable")

from d2r_torchrl.analysis.aggregate import iqm_intervals, largest_logged_q, load_scores, write_report  # noqa: E402
from d2r_torchrl.analysis.plots import read_scalar_csv  # noqa: E402
from d2r_torchrl.training.config import apply_overrides, preset  # noqa: E402

TASKS = ("reach-v3", "push-v3")


def test_iqm_is_the_mean_of_the_middle_half():
    # point 0: sorted [0, 1, 2, 100] -> mean of the middle two = 1.5; point 1: all 3
    scores = np.array([[0.0, 3.0], [100.0, 3.0], [2.0, 3.0], [1.0, 3.0]])  # [runs, points]
    estimate = iqm_intervals({"m": scores}, reps=200)["m"]
    np.testing.assert_allclose(estimate.point, [1.5, 3.0])
    assert estimate.lower[1] == estimate.upper[1] == 3.0  # no spread, no interval
    assert estimate.lower[0] < 1.5 < estimate.upper[0]


def test_bootstrap_resamples_runs_within_each_task():
    # Runs agree within each task (0 on one, 1 on the other): every resample drawn within
    # the tasks has the same scores, so the interval collapses onto the IQM (0.5). A
    # bootstrap over the pooled six scores would not.
    scores = np.array([[[0.0], [1.0]]] * 3)  # [runs=3, tasks=2, points=1]
    estimate = iqm_intervals({"m": scores}, reps=300)["m"]
    assert estimate.point[0] == estimate.lower[0] == estimate.upper[0] == 0.5


def test_intervals_are_reproducible_and_leave_numpy_rng_alone():
    scores = np.random.default_rng(0).random((5, 3, 4))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = iqm_intervals({"a": scores}, reps=300, seed=7)["a"]
    assert (np.random.get_state()[1] == before).all()
    second = iqm_intervals({"a": scores}, reps=300, seed=7)["a"]
    np.testing.assert_array_equal(first.lower, second.lower)
    assert (first.lower <= first.point).all() and (first.point <= first.upper).all()
    assert (first.lower < first.upper).all()
    with pytest.raises(ValueError, match="expected non-empty"):
        iqm_intervals({"a": np.zeros((2, 0))})


def test_csv_reader_keeps_the_last_value_of_a_step_logged_twice(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("10,0.1\n20,0.2\n30,0.3\n20,0.25\n30,0.35\n40,0.4\n")
    assert read_scalar_csv(path) == ([10.0, 20.0, 30.0, 40.0], [0.1, 0.25, 0.35, 0.4])


def test_largest_logged_q_over_tasks_and_rounds_skips_nan(tmp_path):
    assert largest_logged_q(tmp_path) is None  # a run from before the log
    folder = tmp_path / "scalars" / "train" / "q_max"
    folder.mkdir(parents=True)
    (folder / "reach-v3.csv").write_text("10,3.5\n20,nan\n30,-1\n")
    (folder / "push-v3.csv").write_text("10,nan\n20,12.25\n")
    assert largest_logged_q(tmp_path) == 12.25


def _fake_run(root, name, values):
    """A run directory with config.json and per-task eval CSVs: values[metric][task] = [(step, v)]."""
    run = root / name
    config = apply_overrides(preset("d2r", "MT10"), ["env.benchmark=reach-v3,push-v3"])
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    for metric, per_task in values.items():
        folder = run / "scalars" / "eval" / metric
        folder.mkdir(parents=True)
        for task, rows in zip(TASKS, per_task):
            (folder / f"{task}.csv").write_text("".join(f"{s},{v}\n" for s, v in rows))
    return run


def test_report_from_csv_logs(tmp_path):
    # Two runs x two tasks; run b has an extra evaluation point that run a lacks.
    a = _fake_run(tmp_path, "a", {"success": [[(10, 0.0), (20, 0.5)], [(10, 0.0), (20, 1.0)]],
                                  "return": [[(10, 1.0), (20, 4.0)], [(10, 2.0), (20, 8.0)]]})
    b = _fake_run(tmp_path, "b", {"success": [[(10, 0.0), (20, 0.0), (30, 1.0)], [(10, 1.0), (20, 0.25), (30, 1.0)]],
                                  "return": [[(10, 3.0), (20, 2.0), (30, 9.0)], [(10, 4.0), (20, 6.0), (30, 9.0)]]})
    frames, scores = load_scores([a, b], "return")
    assert frames.tolist() == [10, 20] and scores.shape == (2, 2, 2)
    summary = write_report({"d2r": [a, b]}, tmp_path / "report", reps=200)
    # final success scores {0.5, 1.0, 0.0, 0.25}: middle half {0.25, 0.5} -> 0.375
    assert summary["d2r"]["success"]["iqm"][-1] == pytest.approx(0.375)
    # final returns {4, 8, 2, 6}: middle half {4, 6} -> 5; per-task means over runs: 3 and 7
    assert summary["d2r"]["return"]["iqm"][-1] == pytest.approx(5.0)
    assert summary["d2r"]["return"]["final_per_task_mean"] == pytest.approx([3.0, 7.0])
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "| d2r | 2 | 20 | 0.375 [" in markdown and "| push-v3 | 0.62 / 7.0 |" in markdown
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["d2r"]["tasks"] == list(TASKS)


def test_runs_without_evaluation_logs_are_a_clear_error(tmp_path):
    run = _fake_run(tmp_path, "a", {"success": [[(10, 0.0)], [(10, 1.0)]]})
    with pytest.raises(ValueError, match="eval.episodes_per_task"):
        load_scores([run], "return")
