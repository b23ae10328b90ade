"""Server-side SVG charts: the drawn points are the data's points under one affine map per axis."""

from __future__ import annotations

import math
import re

from kd_client.dashboard import charts


def polylines(svg: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(r"<polyline ([^>]*)/>", svg)]


def points(attr: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in attr.split())]


def test_points_map_steps_and_values_onto_the_plot_box():
    svg = charts.line_chart([charts.Series("loss", [0, 5, 10], [1.0, 2.0, 3.0])], width=640, height=240)
    (line,) = polylines(svg)
    # box: left 56, right 628, top 28, bottom 212; the highest value is drawn at the top
    assert points(line["points"]) == [(56.0, 212.0), (342.0, 120.0), (628.0, 28.0)]
    assert line["data-x"] == "0 5 10" and line["data-y"] == "1.0 2.0 3.0" and line["data-label"] == "loss"


def test_log_scale_spaces_decades_evenly():
    (line,) = polylines(charts.line_chart([charts.Series("l", [1, 2, 3], [1.0, 10.0, 100.0])], log_y=True))
    ys = [y for _, y in points(line["points"])]
    assert math.isclose(ys[0] - ys[1], ys[1] - ys[2]) and ys[0] > ys[2]


def test_series_share_the_axes():
    svg = charts.line_chart([charts.Series("a", [0, 10], [0.0, 1.0]), charts.Series("b", [0, 10], [0.0, 2.0])])
    a, b = (points(p["points"]) for p in polylines(svg))
    assert a[0] == b[0] and a[1][1] > b[1][1]  # same origin; b's larger value is drawn higher (smaller y)


def test_non_finite_values_and_non_positive_log_values_are_left_out():
    svg = charts.line_chart([charts.Series("l", [1, 2, 3, 4], [1.0, float("nan"), float("inf"), 0.5])])
    (line,) = polylines(svg)
    assert line["data-x"] == "1 4" and len(points(line["points"])) == 2
    (logline,) = polylines(charts.line_chart([charts.Series("l", [1, 2, 3], [0.0, -1.0, 2.0])], log_y=True))
    assert logline["data-x"] == "3"


def test_a_single_point_or_a_flat_series_is_drawn_inside_the_box():
    (one,) = polylines(charts.line_chart([charts.Series("l", [7], [0.3])], width=640, height=240))
    assert points(one["points"]) == [(342.0, 120.0)]
    (flat,) = polylines(charts.line_chart([charts.Series("l", [0, 1, 2], [2.0, 2.0, 2.0])]))
    assert {y for _, y in points(flat["points"])} == {120.0}


def test_labels_are_escaped_and_empty_charts_say_so():
    svg = charts.line_chart([charts.Series('<script>alert("x")</script>', [0, 1], [1.0, 2.0])], title='"t"')
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "no data" in charts.line_chart([charts.Series("l", [], [])])


def test_sparkline_marks_the_last_value():
    svg = charts.sparkline([0.9, 0.5, 0.2], width=120, height=28)
    (line,) = polylines(svg)
    pts = points(line["points"])
    assert pts[0] == (4.0, 4.0) and pts[-1] == (116.0, 24.0) and line["data-y"] == "0.9 0.5 0.2"
    assert 'cx="116.00" cy="24.00"' in svg
    assert "<polyline" not in charts.sparkline([])
