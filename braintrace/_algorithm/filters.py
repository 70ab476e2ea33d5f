r"""The trace-filter axis: e-prop's low-pass filter of the per-parameter traces, and
:class:`KappaFilter`, a filtered state for signals a user keeps outside the algorithm.

Under ``trace_filter='kappa'`` (``EProp(kappa_filter_decay=kappa)``) the per-parameter engine keeps,
beside each filtered trace :math:`\epsilon_t`, the low-pass
:math:`\bar\epsilon_t = \kappa\,\bar\epsilon_{t-1} + \epsilon_t` and contracts the learning signal
with :math:`\bar\epsilon_t`. In e-prop (Bellec et al. 2020) the filter stands for a leaky read-out
that the learning signal :math:`L_t` sees only at step ``t``; the traces filtered are those of the
weights *behind* a read-out. A read-out's own weights keep their unfiltered trace, which already
carries the read-out's leak (:func:`readout_groups` finds the read-outs).
"""

from __future__ import annotations

import numbers
from typing import Optional, Set

import brainstate
import jax.numpy as jnp
import saiunit as u

from braintrace._compatible_imports import Literal
from braintrace._compiler.jaxpr_tools import is_trainable_etp_eqn

__all__ = ["KappaFilter", "readout_groups", "check_kappa"]


def check_kappa(kappa, owner: str) -> float:
    """``kappa`` as a float in ``[0, 1)``; ``TypeError`` / ``ValueError`` naming ``owner``."""
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
        raise TypeError(f"{owner} must be a float in [0, 1), got {kappa!r}.")
    kappa = float(kappa)
    if not 0.0 <= kappa < 1.0:
        raise ValueError(f"{owner} must lie in [0, 1), got {kappa}.")
    return kappa


def _reaches_trainable_etp(jaxpr, seeds) -> bool:
    reached = set(seeds)
    for eqn in jaxpr.eqns:
        if any((not isinstance(v, Literal)) and v in reached for v in eqn.invars):
            if is_trainable_etp_eqn(eqn):
                return True
            reached.update(eqn.outvars)
    return False


def readout_groups(graph) -> Set[int]:
    """Indices of the hidden groups that are read-outs: neither their previous nor their new values
    reach an operand of a trainable ETP op within the step (they feed no further trained layer).

    A primitive is followed as a whole (every output depends on every input), so a group is a
    read-out only when no path at all leads from it to a trainable ETP op."""
    info = graph.module_info
    jaxpr = info.jaxpr
    in_vars, out_vars = info.state_invars(), info.state_outvars()
    found = set()
    for g in graph.hidden_groups:
        seeds = set()
        for h in g.hidden_leaves:
            for v in (in_vars[h.leaf], out_vars[h.leaf]):
                if not isinstance(v, Literal):
                    seeds.add(v)
        if not _reaches_trainable_etp(jaxpr, seeds):
            found.add(g.index)
    return found


class KappaFilter(brainstate.ShortTermState):
    r"""A low-pass filtered value: :math:`\bar x \leftarrow (1-\kappa)\,x + \kappa\,\bar x`.

    A state for filtering a signal a user keeps outside the algorithm (an output, a reward); the
    algorithms filter their traces themselves (``trace_filter='kappa'``, which accumulates
    :math:`\bar\epsilon \leftarrow \kappa\bar\epsilon + \epsilon` without the :math:`1-\kappa`
    factor). :meth:`reset_state` sets it back to zeros of its initial shape (with ``batch_size``
    as the leading axis when given).

    Parameters
    ----------
    init_value : array
        The initial value; fixes the shape and dtype.
    kappa : float
        :math:`\kappa` in ``[0, 1)``; 0 passes the input through.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> filt = braintrace.KappaFilter(jnp.zeros(3), kappa=0.5)
    >>> print(filt.update(jnp.ones(3)))
    [0.5 0.5 0.5]
    >>> print(filt.update(jnp.ones(3)))
    [0.75 0.75 0.75]
    """

    def __init__(self, init_value, kappa: float):
        value = (
            jnp.asarray(u.get_mantissa(init_value)) if not isinstance(init_value, u.Quantity) else init_value
        )
        super().__init__(value)
        self.kappa = check_kappa(kappa, "KappaFilter: `kappa`")
        self._init_shape = tuple(jnp.shape(value))
        self._init_dtype = u.math.get_dtype(value)
        self._init_unit = u.get_unit(value)

    def update(self, x):
        r""":math:`\bar x \leftarrow (1-\kappa)\,x + \kappa\,\bar x`; returns the new :math:`\bar x`."""
        new = (1.0 - self.kappa) * x + self.kappa * self.value
        self.value = new
        return new

    def reset_state(self, batch_size: Optional[int] = None, **kwargs):
        """Zeros of the initial shape; with ``batch_size``, its leading axis is ``batch_size``
        (prepended to a scalar)."""
        shape = self._init_shape
        if batch_size is not None:
            shape = (batch_size,) if not shape else (batch_size, *shape[1:])
        zeros = jnp.zeros(shape, self._init_dtype)
        self.value = zeros if self._init_unit.is_unitless else u.Quantity(zeros, unit=self._init_unit)
