"""Progress where no terminal shows a bar (a CI log): plain lines, so a long step shows it is alive."""
from __future__ import annotations

import io

from rich.console import Console

from compress import progress


def test_piped_progress_prints_plain_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, width=100))
    monkeypatch.delenv("COMPRESS_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    assert list(progress.track(range(3), "fine-tune 1/2", total=3)) == [0, 1, 2]
    assert out.getvalue() == ""  # under 30 s: nothing
    assert list(progress._plain(range(3), "fine-tune 1/2", 3, every_s=0.0)) == [0, 1, 2]
    assert out.getvalue().splitlines() == ["fine-tune 1/2: 1/3 (0 s)", "fine-tune 1/2: 2/3 (0 s)", "fine-tune 1/2: 3/3 (0 s)"]
    monkeypatch.setenv("COMPRESS_NO_PROGRESS", "1")
    monkeypatch.setattr(progress, "_plain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("printed")))
    assert list(progress.track(range(2), "x")) == [0, 1]
