"""The publisher's delivery-latency histogram: one call for n equal observations, same exposition as Histogram."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from wildfire.publish import PublishMetrics
from wildfire.streaming.metrics import BulkHistogram

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def samples(registry: CollectorRegistry) -> list[str]:
    # Histogram also exports a _created timestamp, and n additions of a value round differently in the
    # last digits of the sum than value * n: both are compared apart.
    return [x for x in generate_latest(registry).decode().splitlines() if "_created" not in x and "_sum " not in x]


def test_unlabelled_counted_observations_expose_what_one_by_one_observations_do():
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = BulkHistogram("lat_seconds", "produce to acknowledgement", None, BUCKETS)
    ours_registry.register(ours)
    reference = Histogram("lat_seconds", "produce to acknowledgement", buckets=BUCKETS, registry=reference_registry)
    # Bucket edges included: a value equal to a bound counts in that bound's bucket.
    for value, n in ((0.003, 5), (0.01, 2), (0.0100001, 1), (0.3, 500), (60, 1), (61.5, 3), (0.0, 1)):
        ours.observe("", value, n)
        for _ in range(n):
            reference.observe(value)
    got = samples(ours_registry)
    assert got == samples(reference_registry)
    assert 'lat_seconds_bucket{le="0.01"} 8.0' in got and "lat_seconds_count 513.0" in got
    assert ours_registry.get_sample_value("lat_seconds_sum") == pytest.approx(
        reference_registry.get_sample_value("lat_seconds_sum"))


def test_publish_metrics_register_the_latency_histogram_under_its_name():
    registry = CollectorRegistry()
    PublishMetrics(registry).latency.observe("", 0.02, 3)
    assert registry.get_sample_value("wildfire_publish_delivery_latency_seconds_count") == 3
    assert registry.get_sample_value("wildfire_publish_delivery_latency_seconds_bucket", {"le": "0.05"}) == 3
