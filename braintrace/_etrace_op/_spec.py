"""``ETPPrimitiveSpec``: one record that describes an ETP primitive completely."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

from ._primitive import ETPPrimitive, register_primitive
from ._registries import ETP_PRIMITIVE_SPECS

__all__ = ["ETPPrimitiveSpec", "register_primitive_spec", "get_primitive_spec"]


@dataclasses.dataclass(frozen=True)
class ETPPrimitiveSpec:
    """Implementation, the four ETP rules and the invar layout of one ETP primitive.

    Passing a spec to :func:`register_primitive_spec` registers the primitive, installs its four
    rules and records the spec in ``ETP_PRIMITIVE_SPECS`` (see :func:`get_primitive_spec`).

    Attributes
    ----------
    name : str
        Primitive name.
    impl : callable
        Forward implementation ``impl(*operands, **params)`` in plain JAX.
    yw_to_w, xy_to_dw, init_drtrl, init_pp : callable
        The four ETP rules (see :mod:`braintrace._etrace_op`).
    trainable_invars_fn : callable
        ``params -> {trainable_key: invar_index}``; required.
    x_invar_index : int or None
        Position of ``x`` in ``eqn.invars`` (``None`` for identity-like ops).
    y_outvar_index : int
        Position of ``y`` in ``eqn.outvars``.
    batched : bool
        ``x`` and ``y`` carry a leading batch axis.
    gradient_enabled : bool
        The compiler walks through this primitive on ``y -> h`` (identity-like ops only).
    batching_rule, kernel_fn : callable, optional
        Passed on to :func:`register_primitive`.
    remat_jvp : bool
        Passed on to :func:`register_primitive`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import braintrace
    >>> spec = braintrace.ETPPrimitiveSpec(
    ...     name='etp_doc_spec', impl=lambda x, w: x @ w,
    ...     yw_to_w=lambda h, tr: {'weight': tr['weight'] * jnp.expand_dims(h, -2)},
    ...     xy_to_dw=lambda x, h, w: {'weight': jnp.outer(x, h)},
    ...     init_drtrl=lambda xv, yv, wv, n: {'weight': jnp.zeros((*wv['weight'].aval.shape, n))},
    ...     init_pp=lambda xv, yv, wv, n: jnp.zeros((*yv.aval.shape, n)),
    ...     trainable_invars_fn=lambda params: {'weight': 1})
    >>> spec.resolve_trainable_invars({})
    {'weight': 1}
    """

    name: str
    impl: Callable
    yw_to_w: Callable
    xy_to_dw: Callable
    init_drtrl: Callable
    init_pp: Callable
    trainable_invars_fn: Optional[Callable[[dict], Dict[str, int]]] = None
    x_invar_index: Optional[int] = 0
    y_outvar_index: int = 0
    batched: bool = False
    gradient_enabled: bool = False
    multiple_results: bool = False
    batching_rule: Optional[Callable] = None
    kernel_fn: Optional[Callable] = None
    remat_jvp: bool = False

    def __post_init__(self):
        if self.trainable_invars_fn is None:
            raise ValueError(
                f"ETPPrimitiveSpec {self.name!r}: `trainable_invars_fn` is required; pass a function "
                f"`params -> {{key: invar_index}}`, e.g. `lambda params: {{'weight': 1}}`."
            )
        for field in ("impl", "yw_to_w", "xy_to_dw", "init_drtrl", "init_pp", "trainable_invars_fn"):
            if not callable(getattr(self, field)):
                raise TypeError(
                    f"ETPPrimitiveSpec {self.name!r}: `{field}` must be callable, "
                    f"got {type(getattr(self, field)).__name__}."
                )

    def resolve_trainable_invars(self, params: dict) -> Dict[str, int]:
        """``{trainable_key: invar_index}`` for an equation with static ``params``."""
        layout = self.trainable_invars_fn(dict(params))
        if not isinstance(layout, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in layout.items()
        ):
            raise TypeError(
                f"ETPPrimitiveSpec {self.name!r}: trainable_invars_fn must return a dict "
                f"{{str: int}}, got {layout!r}."
            )
        return layout


def register_primitive_spec(spec: ETPPrimitiveSpec, *, replace: bool = False) -> ETPPrimitive:
    """Register the primitive described by ``spec`` and install its four rules.

    Returns the new :class:`ETPPrimitive`; ``get_primitive_spec(p) is spec`` afterwards.
    ``replace`` has the meaning of :func:`register_primitive`.
    """
    if not isinstance(spec, ETPPrimitiveSpec):
        raise TypeError(f"`spec` must be an ETPPrimitiveSpec, got {type(spec).__name__}.")
    p = register_primitive(
        spec.name,
        spec.impl,
        batched=spec.batched,
        gradient_enabled=spec.gradient_enabled,
        trainable_invars_fn=spec.trainable_invars_fn,
        x_invar_index=spec.x_invar_index,
        y_outvar_index=spec.y_outvar_index,
        multiple_results=spec.multiple_results,
        batching_rule=spec.batching_rule,
        kernel_fn=spec.kernel_fn,
        remat_jvp=spec.remat_jvp,
        replace=replace,
    )
    p.register_etp_rules(
        yw_to_w=spec.yw_to_w, xy_to_dw=spec.xy_to_dw, init_drtrl=spec.init_drtrl, init_pp=spec.init_pp
    )
    ETP_PRIMITIVE_SPECS[p] = spec
    return p


def get_primitive_spec(primitive) -> ETPPrimitiveSpec:
    """The :class:`ETPPrimitiveSpec` a primitive was registered from.

    Raises ``KeyError`` naming the primitive when it was registered without a spec.
    """
    try:
        return ETP_PRIMITIVE_SPECS[primitive]
    except KeyError:
        raise KeyError(
            f"Primitive {getattr(primitive, 'name', primitive)!r} was not registered from an "
            f"ETPPrimitiveSpec; use register_primitive_spec to publish one."
        ) from None
