"""The grounding check is the evidence now (``worker.evidence``): a value is grounded
when it has a span in the note. Kept so that ``from worker.grounding import ...`` works."""

from worker.evidence import drop_ungrounded, ungrounded_paths

__all__ = ["drop_ungrounded", "ungrounded_paths"]
