r"""Lookup table :class:`Embedding` (the published ``braintrace.nn.Embedding``)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import brainstate
import jax.numpy as jnp

from braintrace._etrace_op import embedding

from ._common import Size

__all__ = ["Embedding"]

init = brainstate.nn.init


class Embedding(brainstate.nn.Embedding):
    r"""A table of ``num_embeddings`` vectors of shape ``embedding_size``, looked up by integer index:
    :math:`y_{\dots} = W[i_{\dots}]`, output shape ``(*indices.shape, *embedding_size)``.

    The lookup is ``brainstate.nn.Embedding``'s (this class subclasses it), with all of its options
    (``padding_idx``, ``max_norm``, ``scale_grad_by_freq``, ``freeze``, ``from_pretrained``).

    **Online learning.** The lookup goes through the ETP op :func:`braintrace.embedding` (indices of
    any shape are flattened into its batch axis and the output unflattened), so the table is an ETP
    weight: when the looked-up vectors drive hidden states directly (``h <- a * h + W[i]``), the
    table gets an exact ``D_RTRL`` trace of shape ``(batch, num_embeddings, features, n)``; when they
    feed another trainable ETP op (a ``Linear``, a cell) the compiler records that the op reaches no
    hidden state and the table gets its exact within-step gradient
    :math:`\partial L_t/\partial W`, the previous hidden states held fixed.

    ``padding_idx``, ``max_norm``, ``scale_grad_by_freq`` and ``freeze`` change the lookup or its
    gradient outside the op; with any of them the lookup is ``brainstate``'s (a plain parameter with
    its within-step gradient, a ``PLAIN_PARAMETER`` record). (The published ``braintrace.nn.Embedding``
    rejects these four options; here they work as in ``brainstate``.) An ``embedding_size`` tuple is
    flattened for the op, so its output reaches the hidden states through a reshape.

    Parameters
    ----------
    num_embeddings : int
        Number of rows (non-negative).
    embedding_size : int or tuple of int
        Shape of each vector.
    embedding_init : initializer or array
        Initializer of the table ``(num_embeddings, *embedding_size)``; default ``LecunUniform()``.
    padding_idx : int, optional
        This row starts at zero and receives no gradient.
    max_norm : float, optional
        Rows looked up with a larger ``norm_type``-norm are renormalised to it (outside the gradient).
    norm_type : float
        Default 2.
    scale_grad_by_freq : bool
        Divide each row's gradient by its count in the indices; default False.
    freeze : bool
        No gradient for the table; default False.
    name : str, optional
    param_type : type
        The ``brainstate.ParamState`` subclass holding the table; default ``ParamState``.

    Attributes
    ----------
    weight : param_type
        The table, shape ``(num_embeddings, *embedding_size)``.
    num_embeddings, embedding_size, out_size

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> layer = braintrace.nn.Embedding(10, 4)
    >>> layer(jnp.array([0, 3, 3])).shape
    (3, 4)
    >>> layer(jnp.array([[0, 1, 2], [3, 4, 5]])).shape
    (2, 3, 4)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_size: Size,
        embedding_init: Union[Callable, jnp.ndarray] = init.LecunUniform(),
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        freeze: bool = False,
        name: Optional[str] = None,
        param_type: type = brainstate.ParamState,
    ):
        super().__init__(
            num_embeddings=num_embeddings,
            embedding_size=embedding_size,
            embedding_init=embedding_init,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            freeze=freeze,
            name=name,
            param_type=param_type,
        )

    def update(self, indices):
        """``weight[indices]``, shape ``(*indices.shape, *embedding_size)``, through the ETP op when
        no lookup option is set (see the class docstring)."""
        options = (self.padding_idx, self.max_norm, self.scale_grad_by_freq or None, self.freeze or None)
        if any(o is not None for o in options):
            return super().update(indices)
        indices = jnp.asarray(indices)
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"Embedding: `indices` must have an integer dtype, got {indices.dtype}.")
        table = self.weight.value
        features = table.shape[1:]
        flat = table.reshape((table.shape[0], -1)) if len(features) != 1 else table
        idx = indices.reshape(-1) if indices.ndim > 1 else indices
        y = embedding(idx, flat)
        return y.reshape((*indices.shape, *features))
