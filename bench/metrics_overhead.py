"""What the request metrics add to one single prediction, in CPU time, in one web process.

    .venv/bin/python bench/metrics_overhead.py [--multiprocess] [--rounds 30]

Two figures: the request hooks alone (timer, latency observation, prediction count) in a tight loop inside one
request context; and single predictions through the Flask test client with the metrics on and off, in
alternating rounds of 300 requests in random order, as medians. --multiprocess counts into files, as gunicorn
does (PROMETHEUS_MULTIPROC_DIR). On a busy machine the second figure varies by about 10 us from run to run.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

ROW = {f"f{i}": 0.5 for i in range(5)}


def hooks_alone(app, n: int = 100_000) -> float:
    """Microseconds of CPU per request for the three metric calls a prediction request makes."""
    from flask import Response, request

    import api.metrics as metrics

    response = Response("x")
    with app.test_request_context("/v1/models/fussy/predict", method="POST"):
        request.url_rule = next(iter(app.url_map.iter_rules("models.predict_post")))
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(n):
                metrics._start()
                metrics._observe(response)
                metrics.count_predictions("fussy", "v1", 1)
            best = min(best, (time.process_time() - started) / n * 1e6)
    return best


def on_and_off(app, rounds: int, per_round: int = 300) -> tuple[float, float]:
    """Median microseconds of CPU per single prediction with the metrics (on, off)."""
    import api.metrics as metrics
    import api.models as models

    client = app.test_client()
    counting = models.count_predictions
    state = {"on": True}

    def switch(on: bool) -> None:
        if on == state["on"]:
            return
        if on:
            app.before_request_funcs[None].insert(0, metrics._start)
            app.after_request_funcs[None].append(metrics._observe)
            models.count_predictions = counting
        else:
            app.before_request_funcs[None].remove(metrics._start)
            app.after_request_funcs[None].remove(metrics._observe)
            models.count_predictions = lambda *args: None
        state["on"] = on

    def run(k: int) -> float:
        started = time.process_time()
        for _ in range(k):
            client.post("/v1/models/fussy/predict", json=ROW)
        return (time.process_time() - started) / k * 1e6

    run(500)  # warm up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on in random.sample([True, False], 2):
            switch(on)
            times[on].append(run(per_round))
    switch(True)
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.multiprocess:  # before prometheus_client is imported, as gunicorn.conf.py does before the fork
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="predq-bench-metrics-")

    from api import create_app
    from tests.support.models import install_test_models

    models_dir = tempfile.mkdtemp(prefix="predq-bench-models-")
    install_test_models(models_dir)
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1/0", "MODELS_DIR": models_dir, "LOG_LEVEL": "WARNING"})
    mode = "multiprocess" if args.multiprocess else "single process"
    print(f"{mode}: request hooks alone {hooks_alone(app):.1f} us per request")
    on, off = on_and_off(app, args.rounds)
    print(f"{mode}: single prediction (test client) {on:.0f} us with metrics, {off:.0f} us without: "
          f"+{on - off:.1f} us")


if __name__ == "__main__":
    main()
