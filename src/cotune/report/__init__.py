"""Metrics log, plots and reports for runs and comparisons. Never imports torch."""

from cotune.report.metrics import MetricsLog, read_metrics
from cotune.report.render import write_compare_report, write_run_report
from cotune.report.runs import RunData, load_run

__all__ = [
    "MetricsLog",
    "RunData",
    "load_run",
    "read_metrics",
    "write_compare_report",
    "write_run_report",
]
