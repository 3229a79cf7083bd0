"""Plan a training run: memory, FLOPs, time, and whether it fits a device.

estimator.py and profiles.py are the arithmetic (they import nothing above the engine: models and trainers call
them); measure.py measures a device and checks predictions against real steps, building models and trainers.
"""
from .estimator import (DoesNotFitError, Plan, activation_floats, check_fits, check_model_fits, count_params)
from .measure import estimate, get_profile, predict_and_measure, profile_device
from .profiles import PROFILES, DeviceProfile
