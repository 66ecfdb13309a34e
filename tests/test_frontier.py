"""The frontier's pieces that need no training: best-of-N's analytic KL, the table and the plot."""

from __future__ import annotations

import math

from preftune.frontier import Point, plot_frontier, write_table


def test_table_and_plot(tmp_path):
    points = [
        Point("reference", None, 1, 0.0, 0.0, 0.1, 0.02),
        Point("best-of-N", None, 4, math.log(4) - 3 / 4, 0.0, 0.4, 0.03),
        Point("DPO beta=0.1", 10, None, 0.8, 0.1, 0.3, 0.04),
        Point("DPO beta=0.1", 20, None, 2.1, 0.2, 0.5, 0.04),
        Point("Preferred-FT", 20, None, 3.0, 0.3, 0.2, 0.05),
    ]
    write_table(points, tmp_path)
    plot_frontier(points, tmp_path / "frontier.png")
    rows = (tmp_path / "frontier.csv").read_text().splitlines()
    assert rows[0] == "method,step,n,kl,kl_stderr,reward,reward_stderr" and len(rows) == 6
    table = (tmp_path / "frontier.md").read_text()
    assert "| best-of-N |  | 4 | 0.64 +- 0.00 | +0.400 +- 0.030 |" in table
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
