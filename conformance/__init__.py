"""normref's conformance tools: importable gradient checks (and, later, the harness)."""

from conformance.gradcheck import (
    GradcheckError,
    GradcheckResult,
    check_hvp,
    check_jvp,
    check_vjp,
    directional_derivative,
    numerical_jacobian,
)

__all__ = [
    "GradcheckError",
    "GradcheckResult",
    "check_hvp",
    "check_jvp",
    "check_vjp",
    "directional_derivative",
    "numerical_jacobian",
]
