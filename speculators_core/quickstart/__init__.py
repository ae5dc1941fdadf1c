"""``speculators quickstart``: the main job, from a verifier and chat data to a served draft."""

from speculators_core.quickstart.pipeline import QuickstartResult, run_quickstart
from speculators_core.quickstart.settings import QuickstartSettings

__all__ = ["QuickstartResult", "QuickstartSettings", "run_quickstart"]
