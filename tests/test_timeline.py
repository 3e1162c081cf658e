"""`bn-inspect timeline` and its reader: what a timeline file holds, merged ranks, every format, exit codes, hostile files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bn_inspect.errors import TimelineFileError
from bn_inspect.options import TimelineFailOn
from bn_inspect.output.render_timeline import peak_step, trend
from bn_inspect.report import timeline_reading
from bn_inspect.report.schemas import schema, timeline_record_schema
from bn_inspect.report.timeline_reading import read_timelines
from tests.helpers import assert_one_error_line, check_golden, deadline, invoke
from tests.test_tables import tokens
from tests.timelines import (
    LAG_EVENT,
    LAYERS,
    NAN_EVENT,
    default_departure,
    event,
    header,
    lines,
    sample,
    timeline_records,
    validation,
    write_timeline,
)

WIDTHS = ("60", "80", "120", "200", "piped")


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    return write_timeline(tmp_path / "run.jsonl", events=[LAG_EVENT, NAN_EVENT], validate_every=50)


def _reference(records: list[dict[str, Any]], layer: str) -> tuple[list[int], list[float | None]]:
    """(steps, departures) of a layer's training samples, straight from the records."""
    steps, scores = [], []
    for record in records:
        if record["record"] == "sample" and record["phase"] == "train":
            entry = next(e for e in record["layers"] if e["layer"] == layer)
            steps.append(record["step"])
            scores.append(entry["departure"])
    return steps, scores


def test_the_reader_keeps_each_layers_training_samples_and_summarizes_them(tmp_path: Path) -> None:
    def departure(layer: str, step: int) -> float:
        # Not monotone, a peak in the middle and a non-finite score at step 60.
        if layer == "features.4" and step == 60:
            return math.nan
        return default_departure(layer, step) + (0.9 if (layer, step) == ("features.8", 40) else 0.0)

    records = timeline_records(120, 10, departure=departure, validate_every=40)
    timeline = read_timelines([write_timeline(tmp_path / "run.jsonl", records)])
    assert [s.layer for s in timeline.series] == list(LAYERS)
    for series in timeline.series:
        steps, scores = _reference(records, series.layer.raw)
        assert list(series.steps) == steps and list(series.departures) == scores
        finite = [(s, d) for s, d in zip(steps, scores, strict=True) if d is not None]
        assert series.first == finite[0][1] and series.last == finite[-1][1]
        top = max(d for _, d in finite)
        assert series.peak == (min(s for s, d in finite if d == top), top)
    assert timeline.series[2].peak == (40, pytest.approx(0.1 + 0.04 + 0.9))
    assert timeline.series[1].departures[5] is None
    # Validation samples are not training samples: counted apart (the end record counts the 12), not in the series.
    assert timeline.num_samples == 12 and timeline.num_validation_samples == 3 and len(timeline.series[0].steps) == 12
    assert [(v.step, v.largest[0]) for v in timeline.validations if v.largest] == [
        (40, "features.8"),
        (80, "features.4"),
        (120, "features.4"),
    ]
    assert timeline.is_complete and timeline.last_step == 120 and not timeline.notes


def test_ranks_merge_by_rank_then_step_whatever_the_order_of_the_files(tmp_path: Path) -> None:
    late = event(30, "BN504", "warning", "features.1", "running buffers differ across ranks", rank=1, max_abs_diff=0.2)
    early = event(20, "BN505", "warning", "features.8", "too few values per channel", rank=1, values_per_channel=4)
    rank1 = write_timeline(tmp_path / "run.rank1.jsonl", rank=1, world_size=2, events=[late, early])
    rank0 = write_timeline(tmp_path / "run.jsonl", rank=0, world_size=2, events=[LAG_EVENT])
    timeline = read_timelines([rank1, rank0])
    assert timeline.ranks == (0, 1) and timeline.world_size == 2
    assert [(e.rank, e.step, e.code) for e in timeline.events] == [(0, 70, "BN506"), (1, 20, "BN505"), (1, 30, "BN504")]
    assert [(s.rank, s.layer) for s in timeline.series] == [(r, name) for r in (0, 1) for name in LAYERS]
    # The first bad step is the earliest over every rank.
    first = timeline.first_bad
    assert first is not None and (first.rank, first.step, first.code) == (1, 20, "BN505")
    assert dict(first.values) == {"values_per_channel": 4.0}


# The BN504 event line a torchrun run with DistributedDataParallel(broadcast_buffers=False) wrote.
BN504_LINE = (
    '{"record":"event","step":5,"rank":0,"code":"BN504","severity":"warning","layer":"1","message":"the ranks hold '
    "different running_mean in 1 (by up to 0.3038): each rank updates its own running statistics (DDP with "
    'broadcast_buffers=False); keep broadcast_buffers=True, use SyncBatchNorm, or average the buffers before saving",'
    '"values":{"max_abs_diff":0.303848,"buffer":"running_mean"}}'
)


def test_the_bn504_event_the_watch_writes_is_read_and_its_buffer_name_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = timeline_records(20, 5, world_size=2, layers=("1",))
    path = tmp_path / "ddp.jsonl"
    path.write_bytes(lines(records[:2]) + BN504_LINE.encode() + b"\n" + lines(records[2:]))
    jsonschema.Draft202012Validator(timeline_record_schema()).validate(json.loads(BN504_LINE))
    (found,) = read_timelines([path]).events
    assert dict(found.values) == {"max_abs_diff": 0.303848, "buffer": "running_mean"}
    result = invoke(capsys, ["timeline", path, "--format", "json"])
    assert result.code == 0, result.err
    document = json.loads(result.out)
    jsonschema.Draft202012Validator(schema("timeline")).validate(document)
    assert document["events"][0]["values"] == {"max_abs_diff": 0.303848, "buffer": "running_mean"}
    assert invoke(capsys, ["timeline", path, "--fail-on", "warning"]).code == 1


def test_the_same_rank_twice_or_two_runs_are_refused(tmp_path: Path) -> None:
    one = write_timeline(tmp_path / "a.jsonl")
    two = write_timeline(tmp_path / "b.jsonl")
    with pytest.raises(TimelineFileError, match="both hold rank 0"):
        read_timelines([one, two])
    other = write_timeline(tmp_path / "c.rank1.jsonl", rank=1, world_size=4)
    with pytest.raises(TimelineFileError, match="runs of 1 and 4 processes"):
        read_timelines([one, other])


@pytest.mark.surface("read:timeline", "traceback")
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": "OtherNet", "every": 7}, "(model DigitsCNN vs OtherNet; sampled every 10 vs 7)"),
        ({"created": "2026-01-01T00:00:00Z"}, "(created 2026-12-07T17:00:00Z vs 2026-01-01T00:00:00Z)"),
        ({"layers": [{"layer": "fc.bn", "kind": "BatchNorm1d", "channels": 4}]}, "(different layers)"),
        ({"rank": 0, "model": "Net"}, "(model DigitsCNN vs Net)"),
    ],
    ids=["model-every", "created", "layers", "another-runs-rank0"],
)
def test_rank_files_of_different_runs_are_refused_in_one_line(
    change: dict[str, Any], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rank0 = write_timeline(tmp_path / "run.jsonl", world_size=2)
    records = timeline_records(rank=1, world_size=2)
    records = [{**records[0], **change}] + [{**r, "rank": change.get("rank", 1)} for r in records[1:]]
    other = write_timeline(tmp_path / "other.rank1.jsonl", records)
    result = invoke(capsys, ["timeline", rank0, other])
    assert result.code == 2
    assert_one_error_line(result, f"timelines {rank0} and {other} are of different runs {fragment}")
    # The ranks of one run stamp their headers seconds apart: merged.
    late = timeline_records(rank=1, world_size=2)
    late[0]["created"] = "2026-12-07T17:00:41+00:00"
    assert read_timelines([rank0, write_timeline(tmp_path / "run.rank1.jsonl", late)]).ranks == (0, 1)


@pytest.mark.parametrize(
    ("fail_on", "code"),
    [("error", 1), ("warning", 1), ("info", 1), ("never", 0)],
)
def test_exit_codes_follow_fail_on_like_check(
    fail_on: str, code: int, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoke(capsys, ["timeline", run_file, "--fail-on", fail_on]).code == code


def test_warnings_fail_only_from_fail_on_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_timeline(tmp_path / "run.jsonl", events=[LAG_EVENT])
    assert invoke(capsys, ["timeline", path]).code == 0
    assert invoke(capsys, ["timeline", path, "--fail-on", "warning"]).code == 1
    info = write_timeline(tmp_path / "info.jsonl", events=[{**LAG_EVENT, "severity": "info"}])
    assert invoke(capsys, ["timeline", info, "--fail-on", "warning"]).code == 0
    assert invoke(capsys, ["timeline", info, "--fail-on", "info"]).code == 1
    assert read_timelines([info], TimelineFailOn.INFO).failed[0].code == "BN506"


def test_the_table_names_the_events_the_first_bad_step_and_each_layer(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, ["timeline", run_file])
    assert result.code == 1 and result.err == ""
    assert "First bad step: step 70, features.4 (BN506)." in result.out
    row = next(line.split() for line in result.out.splitlines() if line.startswith("features.4"))
    # first 0.11 at step 10, last 1.3 at step 100, max 1.3 at step 100.
    assert row[1:5] == ["0.11", "1.3", "1.3", "100"]
    assert "1 error, 1 warning, 0 info: FAILED (fails on error or worse)" in result.out
    # 10 training samples (as the end record counts) and 2 at validation runs, told apart.
    assert "last step 100 · 10 samples, 2 validations" in result.out


def test_a_layer_that_ends_non_finite_shows_it_last_in_every_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def departure(layer: str, step: int) -> float:
        # features.4 goes NaN at step 80 and stays so, as a NaN batch leaves it.
        return math.nan if layer == "features.4" and step >= 80 else default_departure(layer, step)

    path = write_timeline(tmp_path / "run.jsonl", departure=departure)
    series = read_timelines([path]).series[1]
    assert series.last is None and series.ends_nonfinite and series.first == pytest.approx(0.11)
    table = invoke(capsys, ["timeline", path]).out
    row = next(line.split() for line in table.splitlines() if line.startswith("features.4"))
    # last nan (not 0.9, its last finite departure at step 70); the trend ends with its three non-finite samples.
    assert row[1:5] == ["0.11", "nan", "0.7", "70"] and row[5].endswith("!!!")
    assert "! not finite; · not measured" in " ".join(table.split())
    document = json.loads(invoke(capsys, ["timeline", path, "--format", "json"]).out)
    jsonschema.Draft202012Validator(schema("timeline")).validate(document)
    layer = document["layers"][1]
    assert layer["last"] is None and layer["nonfinite"] == [0] * 7 + [12] * 3
    assert document["layers"][0]["last"] == pytest.approx(0.2) and document["layers"][0]["nonfinite"] == [0] * 10
    markdown = invoke(capsys, ["timeline", path, "--format", "markdown"]).out
    assert "| `features.4` | 0.11 | nan | 0.7 | 70 |" in markdown


def test_the_trend_is_on_one_scale_for_every_layer_and_a_constant_series_has_no_peak_step(tmp_path: Path) -> None:
    def departure(layer: str, step: int) -> float:
        # features.1 flat as shown (0.00122), though its last digits move.
        return {"features.1": 0.00122 + step * 1e-9, "features.4": 3.0}.get(layer, 1.0)

    timeline = read_timelines([write_timeline(tmp_path / "run.jsonl", departure=departure)])
    # One scale, 0 to the error tier 1.7: level = round(min(d, 1.7) / 1.7 * 7) of ▁▂▃▄▅▆▇█.
    assert [trend(s) for s in timeline.series] == ["▁" * 10, "█" * 10, "▅" * 10]
    assert [peak_step(s) for s in timeline.series] == ["all"] * 3
    assert peak_step(read_timelines([write_timeline(tmp_path / "b.jsonl")]).series[1]) == "100"


@pytest.mark.parametrize("width", WIDTHS)
def test_the_table_matches_its_golden_file_at_every_width(
    width: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    update_golden: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_timeline(Path("run.jsonl"), events=[LAG_EVENT, NAN_EVENT], validate_every=50)
    if width == "piped":
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", width)
    text = invoke(capsys, ["timeline", "run.jsonl"]).out
    check_golden(f"tables/timeline_{width}.txt", text, update_golden)
    if width != "piped":
        assert all(len(line) <= int(width) and line == line.rstrip() for line in text.splitlines())
        monkeypatch.delenv("COLUMNS")
        piped = invoke(capsys, ["timeline", "run.jsonl"]).out
        assert tokens(text) <= tokens(piped), sorted(tokens(text) - tokens(piped))
        assert set(LAYERS) <= tokens(text)


def test_the_json_output_validates_and_the_file_records_validate(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for line in run_file.read_text(encoding="utf-8").splitlines():
        jsonschema.Draft202012Validator(timeline_record_schema()).validate(json.loads(line))
    result = invoke(capsys, ["timeline", run_file, "--format", "json"])
    document = json.loads(result.out)
    jsonschema.Draft202012Validator(schema("timeline")).validate(document)
    assert document["first_bad_step"]["step"] == 70 and document["passed"] is False
    assert (document["samples"], document["validation_samples"]) == (10, 2)
    assert [layer["max_step"] for layer in document["layers"]] == [100, 100, 100]


def test_a_record_schema_rejects_what_the_reader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(timeline_record_schema())
    good = sample(10, {"features.1": 0.2})
    assert validator.is_valid(good) and validator.is_valid(header())
    for broken in (
        {**good, "phase": "test"},
        {**good, "record": "samples"},
        {k: v for k, v in good.items() if k != "step"},
        {**header(), "version": 2},
        {**header(), "format": "other"},
        {**NAN_EVENT, "severity": "fatal"},
        {**NAN_EVENT, "values": {"buffer": ["running_mean"]}},
    ):
        assert not validator.is_valid(broken), broken


def test_markdown_has_the_verdict_the_events_and_a_row_per_layer(
    run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = invoke(capsys, ["timeline", run_file, "--format", "markdown"]).out
    assert text.startswith("## bn-inspect timeline: ❌ failed")
    assert "**First bad step:** step 70, features.4 (BN506)." in text
    assert "| 90 | 0 | error | BN501 | `features.8` |" in text
    assert sum(line.startswith("| `features.") for line in text.splitlines()) == 3


def test_the_html_page_draws_the_heatmap_the_selector_and_the_events_offline(
    run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "timeline.html"
    assert invoke(capsys, ["timeline", run_file, "--format", "html", "--output", out]).code == 1
    page = out.read_text(encoding="utf-8")
    assert "default-src 'none'" in page and "http://" not in page.split('id="bn-plotly"')[0]
    data = json.loads(page.split('<script type="application/json" id="bn-data">')[1].split("</script>")[0])
    heatmap = data["figures"]["fig-heatmap"]["data"]
    assert heatmap[0]["type"] == "heatmap" and len(heatmap[0]["z"]) == 3 and len(heatmap[0]["x"]) == 10
    assert heatmap[0]["z"][1][-1] == pytest.approx(1.3)
    # The two events are marked on the heatmap, at their step and layer row.
    assert list(zip(heatmap[1]["x"], heatmap[1]["y"], strict=True)) == [(70, "features.4"), (90, "features.8")]
    running = data["figures"]["fig-running"]
    buttons = running["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == list(LAYERS)
    assert [t["visible"] for t in running["data"]] == [True, True] + [False] * 4
    # Choosing features.4 draws its two traces and its event's line.
    assert buttons[1]["args"][0]["visible"] == [False, False, True, True, False, False]
    assert [shape["x0"] for shape in buttons[1]["args"][1]["shapes"]] == [70]
    assert running["data"][2]["y"][-1] == pytest.approx(1.0 + 1.3)


def test_the_validation_gap_names_the_first_layer_that_departs_beside_the_largest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Lightning run's gap with features.4's momentum 0: the gap opens at features.4 (the first, in
    # execution order, at the warning tier 0.83), features.8 only inherits it and is the largest.
    records = timeline_records(50, 10)
    gaps = {"features.1": 0.267, "features.4": 2.79, "features.8": 3.82}
    records.insert(-1, validation(48, gaps))
    records.insert(-1, validation(50, {"features.1": 0.2, "features.4": 0.5, "features.8": 0.6}))
    path = write_timeline(tmp_path / "run.jsonl", records)
    first, calm = read_timelines([path]).validations
    assert first.first_departing == ("features.4", 2.79) and first.largest == ("features.8", 3.82)
    assert calm.first_departing is None
    table = invoke(capsys, ["timeline", path]).out
    assert ["48", "features.4", "2.79", "features.8", "3.82"] in [line.split() for line in table.splitlines()]
    assert ["50", "—", "—", "features.8", "0.6"] in [line.split() for line in table.splitlines()]
    document = json.loads(invoke(capsys, ["timeline", path, "--format", "json"]).out)
    jsonschema.Draft202012Validator(schema("timeline")).validate(document)
    assert document["validations"][0]["first_departing"] == {"layer": "features.4", "departure": 2.79}
    assert document["validations"][1]["first_departing"] is None
    markdown = invoke(capsys, ["timeline", path, "--format", "markdown"]).out
    assert "| 48 | 0 | `features.4` | 2.79 | `features.8` | 3.82 |" in markdown
    out = tmp_path / "t.html"
    invoke(capsys, ["timeline", path, "--format", "html", "--output", out])
    page = out.read_text(encoding="utf-8")
    assert "first departs at features.4, departure 2.79; largest gap at features.8, departure 3.82" in page
    assert "step 50 (rank 0): no layer departs; largest gap at features.8" in page


def test_the_heatmap_draws_non_finite_departures_in_the_error_colour_never_as_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def departure(layer: str, step: int) -> float:
        return math.nan if layer == "features.4" and step >= 80 else default_departure(layer, step)

    path = write_timeline(tmp_path / "run.jsonl", departure=departure, events=[LAG_EVENT])
    out = tmp_path / "t.html"
    invoke(capsys, ["timeline", path, "--format", "html", "--output", out])
    page = out.read_text(encoding="utf-8")
    data = json.loads(page.split('<script type="application/json" id="bn-data">')[1].split("</script>")[0])
    departures, *others = data["figures"]["fig-heatmap"]["data"]
    (cells,) = [trace for trace in others if trace.get("name") == "not finite"]
    assert departures["z"][1][7:] == [None] * 3 and cells["z"][1][7:] == [1] * 3
    assert sum(mark is not None for row in cells["z"] for mark in row) == 3
    assert cells["text"][1][7:] == ["nan"] * 3 and cells["text"][0] == [""] * 10
    # The error tier's colour, not the white of departure 0; the hover says so.
    assert {stop[1] for stop in cells["colorscale"]} == {departures["colorscale"][3][1]} != {"#ffffff"}
    assert "not finite" in cells["hovertemplate"]
    # The events still come last, drawn over the cells.
    assert others[-1]["type"] == "scatter" and "1 event</span>" in page


@pytest.mark.parametrize("width", ["80", "120"])
def test_the_help_keeps_each_example_command_on_one_line(
    width: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", width)
    shown = invoke(capsys, ["timeline", "--help"]).out
    examples = [line.strip() for line in shown.split("Examples:")[1].split("Arguments")[0].splitlines()]
    assert [line for line in examples if line] == [
        "bn-inspect timeline runs/bn-watch.jsonl",
        "bn-inspect timeline runs/bn-watch*.jsonl --fail-on warning",
        "bn-inspect timeline runs/bn-watch.jsonl --format html --output watch.html",
    ]


def test_a_run_killed_or_still_running_is_read_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_timeline(tmp_path / "run.jsonl", events=[LAG_EVENT], is_complete=False)
    result = invoke(capsys, ["timeline", path])
    assert result.code == 0
    assert "has no end record: the run was killed or is still running (last step 100)" in " ".join(result.out.split())
    assert not read_timelines([path]).is_complete


# Hostile files: each ends in one line and exit 2, or is read with a note (a cut-off last line).


@pytest.mark.surface("read:timeline", "traceback")
def test_a_cut_off_last_line_is_dropped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = lines(timeline_records(events=[LAG_EVENT], is_complete=False))
    path = tmp_path / "run.jsonl"
    path.write_bytes(data + json.dumps(sample(110, {"features.1": 0.3}))[:40].encode())
    result = invoke(capsys, ["timeline", path, "--format", "json"])
    assert result.code == 0, result.err
    notes = json.loads(result.out)["notes"]
    assert any("its last line (line 13) is cut off" in note for note in notes), notes
    assert json.loads(result.out)["last_step"] == 100


@pytest.mark.surface("read:timeline", "traceback")
@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda r: r.__setitem__(3, "{not json"), ["line 4 is corrupted: it is not a JSON object"]),
        (lambda r: r.__setitem__(3, '{"record": "sample", "step": 1}'), ["line 4 is corrupted", 'lacks "rank"']),
        (lambda r: r.__setitem__(3, '{"record": "gossip", "step": 1, "rank": 0}'), ["unknown type 'gossip'"]),
        (
            lambda r: r.__setitem__(
                3, '{"record": "end", "step": 1, "rank": 0, "steps": 1, "samples": NaN, "events": 0}'
            ),
            ["line 4 is corrupted: it holds the bare constant NaN"],
        ),
        (
            lambda r: r.__setitem__(3, '{"record": "end", "step": 1, "rank": 0, "steps": ' + "9" * 5000 + "}"),
            ["an integer of 5,000 digits"],
        ),
        (lambda r: r.__setitem__(3, "[1, 2]"), ["unknown type None"]),
        (lambda r: r.__setitem__(3, r[0]), ["line 4 is corrupted: a second header (two timelines in one file?)"]),
        (lambda r: r.__setitem__(4, r[4].replace('"phase": "train"', '"phase": "test"')), ["line 5", "unknown phase"]),
        (
            lambda r: r.__setitem__(4, r[4].replace('"training": true', '"training": 1')),
            ['"training" that is not true or false'],
        ),
        (
            lambda r: r.__setitem__(4, r[4].replace('"rank": 0', '"rank": 3', 1)),
            ["a record of rank 3 in the file of rank 0"],
        ),
    ],
    ids=[
        "not-json",
        "missing-key",
        "unknown-record",
        "nan",
        "huge-integer",
        "array",
        "second-header",
        "phase",
        "bool",
        "rank",
    ],
)
def test_a_corrupted_record_is_one_line_naming_the_file_and_the_line(
    mutate: Any, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.dumps(r) for r in timeline_records(events=[LAG_EVENT])]
    mutate(records)
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    result = invoke(capsys, ["timeline", path])
    assert result.code == 2
    assert_one_error_line(result, str(path), *fragments)


@pytest.mark.surface("read:timeline", "traceback")
def test_bytes_that_are_not_utf8_are_a_corrupted_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = lines(timeline_records()).split(b"\n")
    data[2] = data[2].replace(b"features.4", b"features\xff\xfe")
    path = tmp_path / "run.jsonl"
    path.write_bytes(b"\n".join(data))
    assert_one_error_line(invoke(capsys, ["timeline", path]), "line 3 is corrupted: it is not UTF-8")


@pytest.mark.surface("read:timeline", "traceback")
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n', "is not a bn-inspect timeline"),
        (b"step,loss\n1,0.5\n", "is not a bn-inspect timeline"),
        (json.dumps({**header(), "format": "wandb-history"}).encode() + b"\n", "is not a bn-inspect timeline"),
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (json.dumps({**header(), "version": 2}).encode() + b"\n", "made by a newer bn-inspect (timeline version 2"),
        (json.dumps({**header(), "version": "1"}).encode() + b"\n", "has no valid version"),
        (json.dumps({**header(), "layers": [{"layer": 1}]}).encode() + b"\n", "line 1 is corrupted: layer 0 of the"),
    ],
    ids=["foreign-jsonl", "csv", "other-format", "empty", "blank", "newer", "version-string", "bad-header"],
)
def test_a_foreign_empty_or_newer_file_is_refused_in_one_line(
    content: bytes, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(content)
    result = invoke(capsys, ["timeline", path])
    assert result.code == 2
    assert_one_error_line(result, fragment)
    if "newer" in fragment:
        assert "Upgrade: python -m pip install -U bn-inspect" in result.err


@pytest.mark.surface("read:timeline", "memory", "traceback")
def test_a_huge_line_is_refused_before_it_is_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timeline_reading, "LINE_BUDGET", 2**20)
    path = tmp_path / "run.jsonl"
    path.write_bytes(lines([header()]) + b'{"record": "sample", "x": "' + b"a" * (2 * 2**20) + b'"}\n')
    result = invoke(capsys, ["timeline", path])
    assert_one_error_line(result, "line 2 is over the 1,048,576-byte budget for one record")


@pytest.mark.surface("read:timeline", "memory", "traceback")
def test_a_file_over_the_budget_is_refused_before_any_byte_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(lines([header()]))
    # Sparse: no disk is used, and only the size is looked at.
    os.truncate(path, timeline_reading.TIMELINE_BUDGET + 1)
    assert_one_error_line(invoke(capsys, ["timeline", path]), "over the 1,073,741,824-byte budget")


@pytest.mark.surface("read:timeline", "hang", "traceback")
def test_a_named_pipe_a_directory_or_nothing_is_refused_without_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "run.jsonl"
    os.mkfifo(fifo)
    with deadline(20):
        assert_one_error_line(invoke(capsys, ["timeline", fifo]), "is a named pipe, not a regular file")
    assert_one_error_line(invoke(capsys, ["timeline", tmp_path]), "is a directory")
    assert_one_error_line(invoke(capsys, ["timeline", tmp_path / "missing.jsonl"]), "does not exist")


ESCAPE_NAME = "layer1.\x1b[31mred\x1b]0;title\x07.bn"
ESCAPE_MESSAGE = "running statistics lag\x1b[2J the batches <script>alert(1)</script> | `x`"


@pytest.mark.surface("render:table", "inert")
@pytest.mark.surface("render:json", "inert")
@pytest.mark.surface("render:markdown", "inert")
@pytest.mark.surface("render:html", "inert")
@pytest.mark.parametrize("output_format", ["table", "json", "markdown", "html"])
def test_escapes_in_a_layer_name_or_a_message_are_shown_inert(
    output_format: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = event(20, "BN506", "warning", ESCAPE_NAME, ESCAPE_MESSAGE, departure=1.0, buffer=ESCAPE_MESSAGE)
    path = write_timeline(tmp_path / "run.jsonl", layers=(ESCAPE_NAME, "features.8"), events=[hostile])
    out = tmp_path / "out.txt"
    result = invoke(capsys, ["timeline", path, "--format", output_format, "--output", out])
    text = out.read_text(encoding="utf-8")
    assert result.code == 0 and "\x1b" not in text and "\x07" not in text
    if output_format == "json":
        assert json.loads(text)["events"][0]["layer"] == ESCAPE_NAME
        assert json.loads(text)["events"][0]["values"]["buffer"] == ESCAPE_MESSAGE
    else:
        assert "\\x1b[31mred" in text
    if output_format == "html":
        assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    if output_format == "markdown":
        assert "<script>" not in text and "\\|" in text
