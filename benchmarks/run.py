"""``python -m benchmarks``: the deployment suite (see benchmarks/deploy.py)."""

from benchmarks.deploy import main

main()
