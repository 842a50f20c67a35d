"""Export: SAELens-compatible folders with metrics and a model card."""

from distributed_sae.export.saelens import export

__all__ = ["export"]
