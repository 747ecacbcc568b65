"""fxqat benchmarks: every row measured in the same run, ratios printed against peers."""
