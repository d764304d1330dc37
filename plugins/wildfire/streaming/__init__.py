"""The streaming layers: admission (backpressure), priority queue, throttling, circuit breaker."""
