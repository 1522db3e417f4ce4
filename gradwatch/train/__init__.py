"""Training: the one measured step (``step.py``) that the trainer and GradientWatch share."""
