"""``python -m lightning_fed.experiments compare|sweep|replot ...``."""

import os

from lightning_fed.experiments.commands import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
