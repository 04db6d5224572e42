"""Layer 4: what surgery a model gets (:class:`SurgeryPlan`) and baking it into the weights.
"""
from __future__ import annotations

from surgery.edit.plan import (  # noqa: F401
    SCHEMA,
    ABLATIONS,
    HeadEdit,
    NEURON_FORMS,
    NEURON_SITES,
    NeuronEdit,
    SurgeryPlan,
)
from surgery.edit.bake import (  # noqa: F401
    bake,
    apply_runtime,
    bake_neurons,
)
