"""Progress written to a file or pipe: plain lines every PLAIN_EVERY seconds, and at the end."""

from __future__ import annotations

from engine import progress
from engine.progress import ProgressBar


def test_piped_progress_prints_plain_lines_every_few_seconds(capsys, monkeypatch):
    clock = iter([100.0, 103.0, 111.0, 115.0, 125.0, 130.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with ProgressBar("harvest", 1000) as bar:  # starts at t=100
        bar.update(advance=100)  # t=103: too soon, nothing printed
        bar.update(advance=100, status="20,000 pairs")  # t=111: a line
        bar.update(advance=100)  # t=115: too soon
        bar.update(completed=500)  # t=125: a line
    lines = capsys.readouterr().out.splitlines()  # plus one at exit (t=130)
    assert lines == [
        "harvest: 200/1,000 (20%) 0:00:11 elapsed 18.2/s, 0:00:44 left  20,000 pairs",
        "harvest: 500/1,000 (50%) 0:00:25 elapsed 20.0/s, 0:00:25 left  20,000 pairs",
        "harvest: 500/1,000 (50%) 0:00:30 elapsed 16.7/s, 0:00:30 left  20,000 pairs",
    ]


def test_disabled_progress_prints_nothing(capsys):
    with ProgressBar("train", 10, enabled=False) as bar:
        bar.update(advance=5, status="x")
    with ProgressBar("empty", 0) as bar:
        bar.update(advance=1)
    assert capsys.readouterr().out == ""
