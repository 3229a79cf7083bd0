"""Edge diagnostics: the on-the-edge efficiency model (edge.py) and measurements on a live model (live.py)."""
from .edge import EdgeParams, efficiency_surface, plot_surface
from .live import (DiagnosticsMonitor, edge_of_stability_threshold, fisher_trace, gradient_noise_scale,
                   hessian_vector_product, noise_scale_from_norms, recommend, sharpness)
