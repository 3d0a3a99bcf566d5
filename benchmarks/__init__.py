"""jaxla's benchmark suites (run ``python -m benchmarks.<suite>`` or ``jaxla bench <suite>``)."""
