"""The autoscaler with the local actuator against a real nats-server and real `dicomflow store` processes."""

from __future__ import annotations

import time

from tests.autoscaler_harness import (
    RunningAutoscaler,
    autoscaled_config,
    concurrent_partitions,
    consumer_count,
    publish_studies,
    read_spans,
    split_studies,
    stored_count,
    study_uid,
)
from tests.helpers import wait_for


def _reversals(directions: list[str]) -> int:
    """How often the scaling direction flipped (up after down or down after up)."""
    collapsed = [d for i, d in enumerate(directions) if i == 0 or d != directions[i - 1]]
    return max(0, len(collapsed) - 1)


# Big enough that one worker cannot drain it between two decisions (0.5 s apart) even when the store is fast.
STUDIES, PER_STUDY = 400, 5
BURST = STUDIES * PER_STUDY


def test_burst_scales_up_drains_and_scales_down(tmp_path, nats_server):
    path, config = autoscaled_config(tmp_path, nats_server.url)
    scaler = RunningAutoscaler(path, config, tmp_path / "workers").start()
    try:
        wait_for(lambda: scaler.running() == 1 and consumer_count(config) == 8, 60, what="one worker at min_replicas")
        t0 = time.monotonic()
        published = publish_studies(config, [(study_uid(i), PER_STUDY) for i in range(STUDIES)])
        assert published == BURST
        # Workers scale up: more than one process observed.
        wait_for(lambda: scaler.max_running(t0) > 1, 60, what="a scale-up")
        first_up = next(d for d in scaler.decisions if d.direction == "up" and d.at >= t0)
        assert first_up.lag > first_up.target_lag and first_up.backlog_partitions > 1, first_up.explain()
        # The backlog drains: every instance stored once.
        wait_for(lambda: stored_count(config) == BURST, 180, interval=0.5, what="every burst instance stored")
        # After the scale-down window the group is back at one worker.
        wait_for(lambda: scaler.running() == 1 and scaler.decisions[-1].current == 1, 90, what="a scale-down to 1")
        down = [d for d in scaler.decisions if d.direction == "down" and d.at >= t0]
        assert down and all(d.lag <= d.target_lag for d in down), [d.explain() for d in down]

        # Steady trickle under the target: no scaling decision at all.
        n_before = len(scaler.decisions)
        for i in range(8):
            publish_studies(config, [(study_uid(1000 + i), 2)])
            time.sleep(0.4)
        wait_for(lambda: stored_count(config) == BURST + 16, 60, interval=0.5, what="the trickle stored")
        steady = scaler.decisions[n_before:]
        assert len(steady) >= 4 and all(d.direction == "none" for d in steady), [d.explain() for d in steady]
    finally:
        scaler.stop()

    changes = [d.direction for d in scaler.decisions if d.direction != "none" and d.at >= t0]
    # Up (possibly in steps) then down: never up again after a scale-down in this run.
    assert _reversals(changes) <= 1 and changes[0] == "up", changes
    # Every decision explained with its inputs.
    assert all(f"lag {d.lag}" in d.explain() for d in scaler.decisions)
    spans = read_spans(tmp_path / "workers")
    assert {s["sop"] for s in spans} >= {f"{study_uid(i)}.{k}" for i in range(STUDIES) for k in range(1, PER_STUDY + 1)}
    assert concurrent_partitions(spans, 8) == []
    assert split_studies(spans) <= STUDIES


def test_one_big_study_keeps_one_worker(tmp_path, nats_server):
    """2,000 instances of one study: the lag asks for 100 workers; one partition can use one."""
    path, config = autoscaled_config(tmp_path, nats_server.url)
    scaler = RunningAutoscaler(path, config, tmp_path / "workers").start()
    try:
        wait_for(lambda: scaler.running() == 1 and consumer_count(config) == 8, 60, what="one worker")
        t0 = time.monotonic()
        publish_studies(config, [(study_uid(1, run=7), 2000)])

        def busy():
            return [d for d in scaler.decisions if d.lag >= 5 * d.target_lag]
        wait_for(lambda: len(busy()) >= 6 or stored_count(config) == 2000, 120, what="six decisions under the big backlog")
        big = busy()
        assert big, "the backlog drained before a decision saw it"
        assert all(d.metric_proposal > 1 and d.backlog_partitions == 1 and d.clamp == "BacklogPartitions"
                   and d.desired == 1 for d in big), [d.explain() for d in big]
        assert scaler.max_running(t0) == 1
    finally:
        scaler.stop()
