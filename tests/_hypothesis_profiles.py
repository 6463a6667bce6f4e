"""Hypothesis profiles for cnnx's property tests; import this module before using hypothesis.

    cnnx-ci   (default)  derandomized (the same examples on every run), no example database, no deadline,
                         a bounded number of examples per test: the whole property suite stays well under
                         a minute on 2 cores and a CI failure reproduces bit for bit on a laptop.
    cnnx-dev             random, 10x the examples, keeps its database: for hunting bugs locally.

Select with HYPOTHESIS_PROFILE=cnnx-dev (the environment variable wins over the default).
Each test sets its own max_examples with `examples(n)`, scaled by the profile, so a dev run tries more.
"""
import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("cnnx-ci", derandomize=True, database=None, deadline=None, max_examples=50,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("cnnx-dev", derandomize=False, deadline=None, max_examples=500,
                          suppress_health_check=_SUPPRESS, print_blob=True)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "cnnx-ci")
if PROFILE not in ("cnnx-ci", "cnnx-dev"):
    PROFILE = "cnnx-ci"
settings.load_profile(PROFILE)
_SCALE = 10 if PROFILE == "cnnx-dev" else 1


def examples(n):
    """settings(max_examples=n) under the CI profile, 10n under cnnx-dev (other settings from the profile)."""
    return settings(max_examples=n * _SCALE)
