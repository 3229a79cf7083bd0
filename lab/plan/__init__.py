"""Plan a training run: memory, FLOPs, time, and whether it fits a device."""
from .estimator import Plan, activation_floats, count_params, estimate
from .profiles import PROFILES, DeviceProfile, get_profile, profile_device
