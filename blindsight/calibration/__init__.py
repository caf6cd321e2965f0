"""Calibration (bs-profile): per-head recall of each category on real prompts -> a profile.

Python API: ``calibrate(...) -> CalibrationResult`` (its ``.profile`` is a
:class:`blindsight.profile.Profile`), ``categorize`` and ``head_recalls`` for
the pieces.
"""

from blindsight.calibration.categorize import ThresholdSchedule, categorize, choose_per_prompt
from blindsight.calibration.recall import category_masks, head_recalls

__all__ = ["ThresholdSchedule", "categorize", "choose_per_prompt", "category_masks", "head_recalls", "calibrate"]


def calibrate(*args, **kwargs):
    """See :func:`blindsight.calibration.runner.calibrate` (imported lazily: it needs torch)."""
    from blindsight.calibration.runner import calibrate as _calibrate

    return _calibrate(*args, **kwargs)
