"""Dataset distillation methods (method.md 3): the registry and the trajectory-matching engine.

Built-in methods register themselves in their modules (lors, tesla_vl, mtt_vl); see
`lors.distill.registry` for adding one.
"""

from lors.distill.registry import (DistillMethod, MethodContext, MethodResult, get_method, methods, register,
                                   resolve_settings)

__all__ = ["DistillMethod", "MethodContext", "MethodResult", "get_method", "methods", "register",
           "resolve_settings"]
