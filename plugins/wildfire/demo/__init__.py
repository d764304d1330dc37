"""The offline demo: a local upstream replay, a sensor fleet and the scenario driver."""
