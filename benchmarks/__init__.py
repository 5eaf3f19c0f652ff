"""``priorclip-bench``: latency, throughput and recall parity per backend (``priorclip.benchmarks``)."""
