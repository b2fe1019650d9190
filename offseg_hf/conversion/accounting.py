"""What every conversion shares: the one error type, the rule tables' renaming, and the key accounting.

A converter maps each checkpoint key to one of ours (or drops it by design), then :func:`account_for_keys`
checks the result against the model's own ``{key: shape}``: every model key provided with its shape, every
checkpoint key used. All problems are collected and reported at once, each by the checkpoint's own key name
and ours, in one :class:`ConversionError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

__all__ = ["ConversionError", "KeyRule", "account_for_keys", "expected_shapes", "rename"]


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key or shape at fault."""


# (pattern, replacement): ``re.sub`` semantics; the replacement may be a function of the match.
KeyRule = tuple[str, Union[str, Callable[[re.Match], str]]]


def rename(rules: Sequence[KeyRule], key: str) -> str | None:
    """``key`` renamed by the first rule whose pattern matches it, or ``None`` when none does."""
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def expected_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of ``model_class(config)``'s state dict, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_class(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def account_for_keys(
    mapped: Mapping[str, torch.Tensor],
    expected: Mapping[str, Sequence[int]],
    *,
    sources: Mapping[str, str] | None = None,
    unknown: Mapping[str, torch.Tensor] | None = None,
    problems: Sequence[str] = (),
    what: str = "the model",
    target: str = "model",
) -> None:
    """Check a converted state dict against the model's keys and shapes.

    Args:
        mapped: ``{our key: tensor}`` the converter produced.
        expected: ``{our key: shape}`` of the model (:func:`expected_shapes`, or ``model.state_dict()`` shapes).
        sources: ``{our key: checkpoint key}``, so that problems name the key as it is in the file.
        unknown: checkpoint keys no rule maps (``{key: tensor}``): reported as unexpected.
        problems: further problems the converter found (e.g. a derived buffer that disagrees with ours).
        what: the model in the message's first line (``"OffSeg"``, ``"MSCAN ([32, 64, 160, 256], …)"``).
        target: what the shapes are compared with in ``wrong shape`` lines (``"model"``, ``"backbone"``).

    Raises:
        ConversionError: first line ``the checkpoint does not match WHAT (N problem(s): A wrong shape(s),
            B missing, C unexpected)``, then one line per problem:
            ``unexpected key 'K' (shape S): …``, ``missing key 'OURS' (shape S): …``,
            ``wrong shape for 'K': checkpoint S, model S (→ 'OURS')``.
    """
    sources = sources or {}
    lines = list(problems)
    wrong = missing = extra = 0
    for key, value in (unknown or {}).items():
        lines.append(f"unexpected key {key!r} (shape {tuple(value.shape)}): no parameter of {what} has this name")
        extra += 1
    for key, value in mapped.items():
        source = sources.get(key, key)
        if key not in expected:
            lines.append(f"unexpected key {source!r} (shape {tuple(value.shape)}): maps to {key!r}, which {what} lacks")
            extra += 1
        elif tuple(value.shape) != tuple(expected[key]):
            arrow = f" (→ {key!r})" if source != key else ""
            lines.append(
                f"wrong shape for {source!r}: checkpoint {tuple(value.shape)}, {target} {tuple(expected[key])}{arrow}"
            )
            wrong += 1
    for key, shape in expected.items():
        if key not in mapped:
            lines.append(f"missing key {key!r} (shape {tuple(shape)}): the checkpoint has no tensor for it")
            missing += 1
    if lines:
        raise ConversionError(
            f"the checkpoint does not match {what} ({len(lines)} problem(s): {wrong} wrong shape(s), {missing} missing, "
            f"{extra} unexpected):\n  " + "\n  ".join(lines)
        )
