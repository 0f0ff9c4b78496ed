"""The grounding check is the evidence now (``worker.extract.evidence``): a value is grounded
when it has a span in the note. Kept so that ``from worker.extract.grounding import ...`` works."""

from worker.extract.evidence import drop_ungrounded, ungrounded_paths

__all__ = ["drop_ungrounded", "ungrounded_paths"]
