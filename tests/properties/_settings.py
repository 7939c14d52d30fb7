"""Hypothesis profiles of the property suite and the example counts / sizes each profile uses.

``ci`` (default): derandomized (the same examples every run, no example database), sized so that
the whole suite takes at most about 150 s serially on a 2-core CPU with the kernels in the Triton
interpreter. ``gpu`` (``HYPOTHESIS_PROFILE=gpu``): up to ten times more examples and longer
sequences, run on CUDA when available, within a time budget per test (about 4 minutes in all);
random (``print_blob`` shows how to replay a failure).
"""
import functools
import os
import time

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.differing_executors])
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("gpu", max_examples=100, derandomize=False, **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"HYPOTHESIS_PROFILE: expected 'ci' or 'gpu', got {PROFILE!r}")
settings.load_profile(PROFILE)

#: examples per test, per profile
EXAMPLES = {
    "ci": {"attention": 40, "varlen": 14, "decode": 80},
    # on the GPU the cost is Triton's compilation (nearly every example is a new specialisation:
    # dtype, head_dim, blocks, flags, list widths): the counts are upper bounds, BUDGET_S decides
    "gpu": {"attention": 400, "varlen": 150, "decode": 600},
}[PROFILE]

#: largest sequence lengths drawn (the interpreter is slow: small on the CPU)
MAX_T = {"ci": 150, "gpu": 520}[PROFILE]
MAX_CACHE = {"ci": 300, "gpu": 2048}[PROFILE]


#: gpu profile: seconds per test after which the remaining examples return at once (no kernel
#: launched, a few ms each), so that the profile ends in about 4 minutes however long compilation takes;
#: ``PROPERTY_GPU_BUDGET_SCALE`` scales them. The ci profile has no budget (fixed, reproducible).
BUDGET_S = {"ci": None, "gpu": {"attention": 110.0, "varlen": 45.0, "decode": 45.0}}[PROFILE]
_STARTED: dict = {}


_FAILED: set = set()


def within_budget(name: str) -> bool:
    """False once test ``name`` has run longer than its budget (gpu profile only; never after one of
    its examples failed, so that Hypothesis can still shrink the failure)."""
    if BUDGET_S is None or name in _FAILED:
        return True
    t0 = _STARTED.setdefault(name, time.monotonic())
    return time.monotonic() - t0 < BUDGET_S[name] * float(os.environ.get("PROPERTY_GPU_BUDGET_SCALE", "1"))


def budgeted(name: str):
    """Decorator (under ``@given``): run the example only while ``within_budget(name)``."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not within_budget(name):
                return None
            try:
                return fn(*args, **kwargs)
            except BaseException:
                _FAILED.add(name)
                raise
        return run
    return deco


#: ``PROPERTY_EXAMPLES_SCALE=0.5`` halves every count (time a machine), ``=4`` quadruples them
_SCALE = float(os.environ.get("PROPERTY_EXAMPLES_SCALE", "1"))


def examples(name: str) -> settings:
    """``@settings`` of one property test: the loaded profile with that test's example count."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, round(EXAMPLES[name] * _SCALE)))
