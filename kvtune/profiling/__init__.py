"""Per-layer sensitivity of a model to KV quantization (``kvtune profile``)."""

from kvtune.profiling.artifact import Profile
from kvtune.profiling.profile import DEFAULT_PAIRS, ProfileSettings, run_profile

__all__ = ["DEFAULT_PAIRS", "Profile", "ProfileSettings", "run_profile"]
