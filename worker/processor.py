"""``worker.processor.MedicalDataProcessor``: the import path the contract promises
(../shared/CONTRACT.md, "Python"). The processor lives in ``worker.extract``."""

from worker.extract.processor import MedicalDataProcessor

__all__ = ["MedicalDataProcessor"]
