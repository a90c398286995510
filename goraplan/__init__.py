"""goraplan: GoRA stage one. Accumulated gradients -> per-layer ranks and initial adapters -> `plan.gora`.

>>> import goraplan
>>> plan = goraplan.build_plan(model, batches, goraplan.PlanSettings(rank=8))  # doctest: +SKIP
>>> plan.save("plan.gora")                                                     # doctest: +SKIP
>>> goraplan.load_plan("plan.gora").ranks                                      # doctest: +SKIP
"""

from goraplan.build import build_plan
from goraplan.errors import GoraError, PlanFormatError
from goraplan.plan import SCHEMA_VERSION, TOOL_VERSION, Manifest, Plan, load_plan
from goraplan.settings import PlanSettings

__version__ = TOOL_VERSION
__all__ = [
    "GoraError",
    "Manifest",
    "Plan",
    "PlanFormatError",
    "PlanSettings",
    "SCHEMA_VERSION",
    "build_plan",
    "load_plan",
]
