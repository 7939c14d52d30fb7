"""Hypothesis profiles of the property suite and the example counts / sizes each profile uses.

``ci`` (default): derandomized (the same examples every run, no example database), sized so that
the whole suite takes at most about 150 s serially on a 2-core CPU with the kernels in the Triton
interpreter. ``gpu`` (``HYPOTHESIS_PROFILE=gpu``): several times more examples and longer
sequences, run on CUDA when available; random (``print_blob`` shows how to replay a failure).
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.differing_executors])
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("gpu", max_examples=120, derandomize=False, **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"HYPOTHESIS_PROFILE: expected 'ci' or 'gpu', got {PROFILE!r}")
settings.load_profile(PROFILE)

#: examples per test, per profile
EXAMPLES = {
    "ci": {"attention": 40, "varlen": 14, "decode": 40},
    "gpu": {"attention": 120, "varlen": 40, "decode": 120},
}[PROFILE]

#: largest sequence lengths drawn (the interpreter is slow: small on the CPU)
MAX_T = {"ci": 150, "gpu": 520}[PROFILE]
MAX_CACHE = {"ci": 300, "gpu": 2048}[PROFILE]


#: ``PROPERTY_EXAMPLES_SCALE=0.5`` halves every count (time a machine), ``=4`` quadruples them
_SCALE = float(os.environ.get("PROPERTY_EXAMPLES_SCALE", "1"))


def examples(name: str) -> settings:
    """``@settings`` of one property test: the loaded profile with that test's example count."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, round(EXAMPLES[name] * _SCALE)))
