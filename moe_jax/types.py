"""Type aliases shared across moe_jax."""

from typing import Any, Callable, Sequence, Tuple, Union

import jax

Array = jax.Array
DType = Any
PRNGKey = jax.Array
Shape = Sequence[int]
Initializer = Callable[[PRNGKey, Shape, DType], Array]
LogicalAxes = Tuple[Union[str, None], ...]
