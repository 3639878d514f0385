"""The soak in miniature: 30 seconds of churn and injected faults against the
unchanged Lambda on the local stack, then every promise of `make soak` checked
(loadtest/soak.py), read back from the report it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_thirty_seconds_of_churn_and_faults_keep_every_promise(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "loadtest.soak", "--results", str(tmp_path)),
        *("--run-time", "30s", "--users", "24", "--rooms", "6", "--churn-interval", "10"),
        # A short connect window, so the sweep need not wait the production 30 s.
        *("--connect-window", "3"),
    ]
    finished = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    output = finished.stdout[-6000:] + finished.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())

    assert finished.returncode == 0 and report["holds"], output
    delivery, posts = report["delivery"], report["posts"]
    # The faults really happened...
    assert posts["injectedGone"] > 0 and posts["injectedThrottle"] > 0
    assert report["sweep"]["staleRemoved"] + delivery["server_stale"] > 0
    # ...and still: nothing owed was lost, misrouted or duplicated, nothing was left.
    assert delivery["expected"] > 0 and delivery["lost"] == 0
    assert delivery["wrong_room"] == delivery["duplicates"] == 0
    assert report["tableItemsLeft"] == 0
    assert (
        "| the table is empty once everybody has gone | 0 items | yes |"
        in (tmp_path / "soak.md").read_text()
    )
