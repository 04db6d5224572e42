"""Layer 4: what surgery a model gets (:class:`SurgeryPlan`) and baking it into the weights.
"""
from __future__ import annotations

from surgery.edit.bake import (  # noqa: F401
    apply_runtime,
    bake,
    bake_balance,
    bake_neurons,
    open_balance_module,
)
from surgery.edit.plan import (  # noqa: F401
    ABLATIONS,
    NEURON_FORMS,
    NEURON_SITES,
    SCHEMA,
    BalanceEdit,
    HeadEdit,
    NeuronEdit,
    OpenBalanceEdit,
    SurgeryPlan,
)
