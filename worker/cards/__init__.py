"""GEN's Lipsync card settings per target (``lipSyncModel``, ``autoGenerate``) and the automatic
generations that follow a target's sources (see docs/cards.md)."""
