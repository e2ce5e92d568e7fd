"""The GenTron model package: the transformer, its named configs and its cost."""

from pipelines.model.conditioning import TextCondition
from pipelines.model.configs import MODEL_SIZES, model_config
from pipelines.model.flops import ModelCost, count_parameters, meta_model, model_cost
from pipelines.model.gentron import GenTronTransformer

__all__ = [
    "GenTronTransformer",
    "MODEL_SIZES",
    "ModelCost",
    "TextCondition",
    "count_parameters",
    "meta_model",
    "model_config",
    "model_cost",
]
