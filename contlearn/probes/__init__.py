"""Probes: the measures (pure functions of a network and a probe batch, docs/design.md §5) and the
schedule that runs them beside learning.

The public names for plug-in probes are re-exported here: ``contlearn.probes.register_probe``.
"""

from contlearn.probes import churn as _churn  # noqa: F401 - registers its probe
from contlearn.probes import toolkit as _toolkit  # noqa: F401 - registers its probes
from contlearn.probes.measures import PROBES, ProbeContext, parse_probes, register_probe

__all__ = ["PROBES", "ProbeContext", "parse_probes", "register_probe"]
