"""``python -m benchmarks``: the deployment suite (see benchmarks/deploy.py)."""

from .deploy import main

main()
