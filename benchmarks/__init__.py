"""Speed and quality benchmarks of semisam-o1: run each as ``python -m benchmarks.NAME --help``
from the repository root (the package must be installed: ``bash scripts/setup.sh``)."""
