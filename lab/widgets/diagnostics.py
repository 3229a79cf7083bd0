"""EdgeDiagnosticsPanel: the live diagnostics over training (sharpness against its threshold, Fisher trace, noise
scale, edge band %, efficiency products, flat-region flag) with colour-coded status and the recommendation, and
the efficiency-surface plots of the on-the-edge model."""
import traitlets as t

from ..checks import show
from .base import Panel, figure_png, jsonable, panel_css, panel_module

REPORT_KEYS = ("step", "lr", "sharpness", "threshold", "fisher_trace", "noise_scale", "batch_size",
               "edge_band_pct", "flat", "loss_slope", "efficiency", "recommendation")


class EdgeDiagnosticsPanel(Panel):
    _esm = panel_module("edge_diagnostics.js")
    _css = panel_css()

    reports = t.List([]).tag(sync=True)
    surface_png = t.Unicode("").tag(sync=True)     # base64 PNG of the efficiency-surface figure
    surface_summary = t.Dict({}).tag(sync=True)

    def __init__(self, monitor=None, reports=None, surface=True, **kwargs):
        super().__init__(**kwargs)
        from ..diagnostics import DiagnosticsMonitor
        if monitor is not None and not isinstance(monitor, DiagnosticsMonitor):
            raise ValueError(f"monitor must be a lab.diagnostics.DiagnosticsMonitor, got {show(monitor)}")
        self.monitor, self._synced = monitor, 0   # (the monitor's reports shown so far)
        if reports:
            self.add_reports(reports)
        if monitor is not None:
            self._sync_from_monitor(None)
            monitor.trainer.callbacks.append(self._sync_from_monitor)
        if surface:
            from ..diagnostics.edge import efficiency_surface, plot_surface
            r = efficiency_surface()
            self.surface_summary = {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.summary.items()}
            self.surface_png = figure_png(plot_surface(r))

    def add_reports(self, reports):
        if not isinstance(reports, (list, tuple)) or not all(isinstance(r, dict) for r in reports):
            raise ValueError(f"reports must be a list of DiagnosticsMonitor reports (dicts), got {show(reports)}")
        clean = [{k: jsonable(r.get(k)) for k in REPORT_KEYS} for r in reports]
        self.reports = self.reports + clean

    def _sync_from_monitor(self, record):
        # counted apart from self.reports: reports given or added besides the monitor's made it skip as many new ones
        new = self.monitor.reports[self._synced:]
        if new:
            self._synced += len(new)
            self.add_reports(new)

    def _static_html(self):
        return f"<b>EdgeDiagnosticsPanel</b>: {len(self.reports)} diagnostics reports"

    def _static_png(self):
        return self.surface_png
