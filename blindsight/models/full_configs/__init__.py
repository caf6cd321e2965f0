"""Whole VLM configurations (text and vision) of public checkpoints, from their
published config.json: the full-size random checkpoints of
:mod:`blindsight.models.fullsize` are made from these."""
