"""Suite-wide settings: hypothesis draws the same examples on every run (derandomized), so CI is
reproducible. ``HYPOTHESIS_PROFILE=explore pytest …`` draws new random examples instead."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("fedmerge", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fedmerge"))
