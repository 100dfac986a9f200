"""``ds-structopt plan``: memory, refresh load and communication of a run, predicted without running it."""
from .model_shapes import ParamSpec, model_params
from .planner import Plan, make_plan

__all__ = ["ParamSpec", "model_params", "Plan", "make_plan"]
