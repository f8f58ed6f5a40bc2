"""Output specs: the names of a model's output columns (classes, or a logits head's vocabulary).

Work in progress (the lead): see `plan_outputs`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

OutputSpec = Mapping[str, Union[Sequence[Hashable], Mapping[str, Any]]]
