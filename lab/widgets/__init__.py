"""Notebook panels (anywidget): the Python side of each widget; the ESM/CSS front ends live in widgets/ at the
repository root and ship inside the wheel as lab/static/widgets."""
from .base import asset
from .training import TrainingPanel
from .attention import AttentionHeatmap
from .plan import PlanEstimator
from .generation import GenerationPanel
from .diagnostics import EdgeDiagnosticsPanel
from .interp import LogitLensPanel, PatchingPanel

__all__ = ["TrainingPanel", "AttentionHeatmap", "PlanEstimator", "GenerationPanel", "EdgeDiagnosticsPanel",
           "LogitLensPanel", "PatchingPanel", "asset"]
