"""Memory planner: parameters, gradients, optimizer state and activations per GPU and pipeline stage."""

from megatron_asvr.planner.plan import Cluster, MemoryPlan, StagePlan, format_plan, plan_memory

__all__ = ["Cluster", "MemoryPlan", "StagePlan", "format_plan", "plan_memory"]
