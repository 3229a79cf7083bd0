"""Plan a training run: memory, FLOPs, time, and whether it fits a device."""
from .estimator import (DoesNotFitError, Plan, activation_floats, check_fits, check_model_fits, count_params,
                        estimate, predict_and_measure)
from .profiles import PROFILES, DeviceProfile, get_profile, profile_device
