r"""Lookup table :class:`Embedding` (the published ``braintrace.nn.Embedding``)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import brainstate
import jax.numpy as jnp

from ._common import Size

__all__ = ["Embedding"]

init = brainstate.nn.init


class Embedding(brainstate.nn.Embedding):
    r"""A table of ``num_embeddings`` vectors of shape ``embedding_size``, looked up by integer index:
    :math:`y_{\dots} = W[i_{\dots}]`, output shape ``(*indices.shape, *embedding_size)``.

    The lookup is ``brainstate.nn.Embedding``'s (this class subclasses it), with all of its options
    (``padding_idx``, ``max_norm``, ``scale_grad_by_freq``, ``freeze``, ``from_pretrained``).

    **Online learning.** The gather is not an ETP primitive: the table is a *plain parameter*. Its
    gradient is the exact within-step gradient :math:`\partial L_t/\partial W` with the previous
    hidden states held fixed, and the compiler records it as ``PLAIN_PARAMETER``; the effect of
    ``W`` on later steps through the hidden states is not carried by any trace. This is exact when
    the looked-up vectors do not drive a recurrence (token embeddings feeding a ``Linear`` or a cell,
    whose own weights are the relations) and truncated otherwise. To learn a table online that drives
    hidden states directly, feed one-hot vectors to a :class:`~braintrace.nn.Linear` without bias:
    ``one_hot(i) @ W == W[i]``, and ``W`` becomes a relation with a dense ``D_RTRL`` trace
    ``(batch, num_embeddings, features, n)``.

    (The published ``braintrace.nn.Embedding`` routes the gather through an ETP ``embedding`` op and
    rejects ``padding_idx``, ``max_norm``, ``scale_grad_by_freq`` and ``freeze``; here they work as
    in ``brainstate``.)

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
