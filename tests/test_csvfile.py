"""One CSV writer: fields with commas, quotes or newlines survive a round trip through csv.DictReader."""

from __future__ import annotations

import csv

from dsire.csvfile import csv_text, write_csv


def test_awkward_fields_round_trip(tmp_path):
    rows = [{"voter": 'unet.a,"b"/delta', "accuracy": 0.5}, {"voter": "line\nbreak", "accuracy": 1}]
    path = tmp_path / "deep" / "t.csv"
    write_csv(path, ("voter", "accuracy"), rows)
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [{"voter": 'unet.a,"b"/delta', "accuracy": "0.5"}, {"voter": "line\nbreak", "accuracy": "1"}]
    assert csv_text(("a", "b"), [{"a": 1}]) == "a,b\n1,\n"
