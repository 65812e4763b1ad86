"""One CSV writer (dsire.atomic): fields with commas, quotes or newlines survive a round trip."""

from __future__ import annotations

import csv

from dsire.atomic import atomic_write_csv, csv_text


def test_awkward_fields_round_trip(tmp_path):
    rows = [{"voter": 'unet.a,"b"/delta', "accuracy": 0.5}, {"voter": "line\nbreak", "accuracy": 1}]
    path = tmp_path / "deep" / "t.csv"
    atomic_write_csv(path, ("voter", "accuracy"), rows)
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [{"voter": 'unet.a,"b"/delta', "accuracy": "0.5"}, {"voter": "line\nbreak", "accuracy": "1"}]
    assert csv_text(("a", "b"), [{"b": 2, "a": 1}, [3, "x,y"]]) == 'a,b\n1,2\n3,"x,y"\n'
