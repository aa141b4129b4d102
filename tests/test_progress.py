"""Progress bars redraw normally on a terminal and sparsely into logs."""

from __future__ import annotations

import io

from unirl.progress import NON_TTY_INTERVAL, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_stream_gets_a_long_redraw_interval_and_still_reports_the_end():
    log = io.StringIO()
    bar = progress_bar(range(1000), desc="stage", file=log)
    assert bar.mininterval == NON_TTY_INTERVAL
    assert sum(1 for _ in bar) == 1000
    bar.close()
    out = log.getvalue()
    assert "1000/1000" in out  # the final state is always written
    assert out.count("stage") <= 3  # the first draw and the last, not one per item


def test_terminal_keeps_tqdm_defaults_and_explicit_settings_win():
    assert progress_bar(range(3), file=_Terminal()).mininterval == 0.1
    assert progress_bar(range(3), file=io.StringIO(), mininterval=1.0).mininterval == 1.0
