"""Bounded HTTP load against a running service with `hey` (a standard load generator; Debian package
`hey`), read per request from its CSV output. Used by the Serve load test and bench/bench_serve.py.

    run_hey("http://127.0.0.1:8000/v1/answer", body, concurrency=128, requests=2560)
    -> LoadResult(statuses, latencies, wall_s): requests/s and p50/p99 of the 200s, codes by count

`hey` prints one CSV row per request (response time, ..., status code, start offset); a request that
failed at the transport level (refused, reset, timed out) has no row, so `failed` counts the rows
missing from the requested number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field


def hey_path() -> str | None:
    return shutil.which("hey")


@dataclass
class LoadResult:
    concurrency: int
    requested: int
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    offsets: list[float] = field(default_factory=list)  # when each answered request was sent, s from the start
    wall_s: float = 0.0

    @property
    def codes(self) -> dict[int, int]:
        return dict(sorted(Counter(self.statuses).items()))

    @property
    def failed(self) -> int:
        """Requests with no HTTP answer at all (connection refused/reset, client timeout)."""
        return self.requested - len(self.statuses)

    def latencies_of(self, status: int) -> list[float]:
        return [t for t, s in zip(self.latencies, self.statuses) if s == status]

    def ok_latencies(self) -> list[float]:
        return self.latencies_of(200)

    def max_in_flight(self, status: int = 200) -> int:
        """The most requests answered `status` that were in flight at one moment (client-side: from
        sending to the answer read). A bounded queue caps this for the 200s; an unbounded one lets every
        closed-loop worker hold a request that is eventually answered."""
        events = sorted((t, d) for o, lat, s in zip(self.offsets, self.latencies, self.statuses) if s == status
                        for t, d in ((o, 1), (o + lat, -1)))  # at equal times the end (-1) sorts first
        most = now = 0
        for _, d in events:
            now += d
            most = max(most, now)
        return most

    def mean_in_flight(self, status: int = 200) -> float:
        """Requests answered `status` in flight on average over the run (Little's law: their summed
        latencies over the wall time); steadier than the maximum, which one slow moment sets."""
        return sum(self.latencies_of(status)) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        """Answers with status 200 per second of wall time."""
        return self.codes.get(200, 0) / self.wall_s if self.wall_s > 0 else 0.0

    def ok_pct(self, q: float) -> float:
        import numpy as np

        ok = self.ok_latencies()
        return float(np.percentile(ok, q)) if ok else float("nan")

    def row(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requested, "ok_rps": round(self.ok_rps, 2),
                "p50_s": round(self.ok_pct(50), 3), "p99_s": round(self.ok_pct(99), 3), "wall_s": round(self.wall_s, 2),
                "codes": {str(k): v for k, v in self.codes.items()}, "failed": self.failed}


def parse_hey_csv(text: str, concurrency: int, requested: int) -> LoadResult:
    """hey's `-o csv` rows: response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset."""
    out = LoadResult(concurrency=concurrency, requested=requested)
    end = 0.0
    for row in csv.DictReader(io.StringIO(text)):
        try:
            t, status, offset = float(row["response-time"]), int(row["status-code"]), float(row["offset"])
        except (KeyError, TypeError, ValueError):
            continue
        out.latencies.append(t)
        out.statuses.append(status)
        out.offsets.append(offset)
        end = max(end, offset + t)
    out.wall_s = end
    return out


def run_hey(url: str, body: dict, *, concurrency: int, requests: int, timeout_s: int = 60,
            hey: str | None = None) -> LoadResult:
    """POST `body` as JSON `requests` times from `concurrency` closed-loop workers (each sends its next
    request when the last one is answered)."""
    hey = hey or hey_path()
    if hey is None:
        raise FileNotFoundError("`hey` is not installed: apt-get install -y hey")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(body, f)
        path = f.name
    try:
        proc = subprocess.run(
            [hey, "-n", str(requests), "-c", str(concurrency), "-t", str(timeout_s), "-m", "POST",
             "-T", "application/json", "-D", path, "-o", "csv", url],
            capture_output=True, text=True, timeout=timeout_s * (requests // concurrency + 2) + 60)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise RuntimeError(f"hey failed ({proc.returncode}): {proc.stderr[-2000:]}")
    # hey gives each worker requests // concurrency requests: that many are sent in all.
    return parse_hey_csv(proc.stdout, concurrency, (requests // concurrency) * concurrency)
