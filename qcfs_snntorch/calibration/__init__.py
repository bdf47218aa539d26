"""Calibration without training: the ANN's λ and BN statistics (:mod:`.thresholds`) and the
converted SNN's initial membrane potentials (:mod:`.potentials`)."""

from .potentials import METHODS, calibrate_potentials
from .thresholds import calibrate_from_data, silent_layers

__all__ = ["METHODS", "calibrate_from_data", "calibrate_potentials", "silent_layers"]
