"""Command lines of :mod:`mace_lpcalc.training.reference` (``python -m mace_lpcalc.reference.generate``, ``.npt``, ``.check``)."""
