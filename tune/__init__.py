"""Hyperparameter search over the training job: Ray Tune + ASHA around ``train.loop`` (``python -m tune``)."""
