"""Models: the draft model, the main coarse-to-fine decoder and their LightningModules."""

from rsd.models.draft import RFSQDraftModelWithProjection

__all__ = ["RFSQDraftModelWithProjection"]
