"""Shared input checks for the algorithm modules.

Every check raises ``ValueError`` naming the argument, what is wrong and the offending values (row indices, shapes,
names), so a user mistake is reported where it is made rather than as a NaN three phases later.

The data-dependent checks (``.any()`` on a tensor) force one host-device sync each. They are cheap next to a model
forward, but every public function that calls them takes ``validate=True`` so a hot loop that has already validated its
batch can switch them off.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch

from megaseg.algorithms.masking import any_true, count_true, zero_outside

# Report at most this many offending rows in a message: enough to debug, short enough to read.
_MAX_REPORTED = 8


def _rows(bad_rows: torch.Tensor) -> str:
    """Format the indices of the True entries of a [batch] bool tensor for an error message."""
    idx = torch.nonzero(bad_rows, as_tuple=False).flatten().tolist()
    shown = idx[:_MAX_REPORTED]
    more = f" (and {len(idx) - len(shown)} more)" if len(idx) > len(shown) else ""
    return f"{shown}{more}"


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    """``value`` must be one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], like: str) -> None:
    """``tensor`` must have exactly ``shape`` (the shape of the argument called ``like``)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {like} has shape {tuple(shape)}; they must match")


def check_2d(name: str, tensor: torch.Tensor) -> None:
    """Batched per-token tensors are [batch, seq]."""
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(tensor.shape)}")


def check_bool(name: str, tensor: torch.Tensor) -> None:
    """Masks must be bool so that ``~mask`` means "not" rather than bitwise-not of an int."""
    if tensor.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {tensor.dtype}; use mask.bool()")


def check_finite(
    name: str,
    tensor: torch.Tensor,
    where: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    validate: bool = True,
) -> None:
    """No NaN/inf in ``tensor`` (only at the positions where ``where`` is True, if given; a function returning that
    mask is called only when the fast path below fails, for masks that cost more to build than the check).

    Fast path: NaN and inf propagate through a sum, so a finite sum proves every summed entry finite with one cheap
    pass (one host sync). The whole tensor is summed first, as it is usually finite everywhere; if not, the unselected
    entries are zeroed without being read (``zero_outside``) and summed again. A non-finite sum of the selection (a
    bad entry, or a harmless overflow) pays for the exact per-entry check.
    """
    if not validate:
        return
    selected = tensor.detach()
    if math.isfinite(selected.sum()):  # one op and a host read (torch.isfinite is several ops)
        return
    if where is not None:
        selected = zero_outside(selected, where() if callable(where) else where)
        if math.isfinite(selected.sum()):
            return
    bad = ~torch.isfinite(selected)
    if bool(bad.any()):
        detail = f" in rows {_rows(bad.flatten(1).any(dim=1))}" if bad.dim() >= 2 else ""
        raise ValueError(f"{name} contains NaN or inf{detail}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    """A number in [0, 1] (a discount, a GAE lambda)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_nonnegative_float(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_response_mask_types(response_mask: torch.Tensor) -> None:
    check_bool("response_mask", response_mask)
    check_2d("response_mask", response_mask)


def _check_eos_mask_types(eos_mask: torch.Tensor, response_mask: torch.Tensor) -> None:
    check_bool("eos_mask", eos_mask)
    check_shape("eos_mask", eos_mask, response_mask.shape, "response_mask")


def _run_counts(mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` long: number of runs of True in each row (1 for a valid response mask).

    Every run has two edges: a change between neighbours, or the row's first or last entry being True.
    """
    changes = count_true(mask[:, 1:] ^ mask[:, :-1], dim=1)
    as_bytes = mask.view(torch.uint8)
    return (changes + as_bytes[:, 0] + as_bytes[:, -1]) // 2


def _misplaced_eos(eos_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: EOS marks that are not a response token followed by a non-response token (or the end)."""
    misplaced = eos_mask & ~response_mask
    misplaced[:, :-1] |= eos_mask[:, :-1] & response_mask[:, 1:]
    return misplaced


def _raise_response_mask_error(num_runs: torch.Tensor) -> None:
    empty = num_runs == 0
    if bool(empty.any()):
        raise ValueError(
            f"response_mask rows {_rows(empty)} have no response tokens; every row needs at least one "
            "(drop empty responses before scoring)"
        )
    raise ValueError(
        f"response_mask rows {_rows(num_runs > 1)} hold more than one run of response tokens; the response must be "
        "contiguous (prompt first, then response, then right padding)"
    )


def _raise_eos_mask_error(eos_mask: torch.Tensor, misplaced: torch.Tensor) -> None:
    many = count_true(eos_mask, dim=1) > 1
    if bool(many.any()):
        raise ValueError(f"eos_mask rows {_rows(many)} have more than one EOS; at most one per row is allowed")
    raise ValueError(
        f"eos_mask rows {_rows(misplaced.any(dim=1))} mark an EOS that is not the last response token of the row"
    )


def check_response_mask(response_mask: torch.Tensor, validate: bool = True) -> None:
    """[batch, seq] bool; each row holds one contiguous, non-empty run of response tokens.

    Contiguity is what lets the segment math use cumulative sums over the whole row: a prompt token between two response
    tokens would otherwise be counted inside a segment. Both properties are one test: every row has exactly one
    run start (one host sync; the diagnosis runs only on failure).
    """
    _check_response_mask_types(response_mask)
    if not validate:
        return
    num_runs = _run_counts(response_mask)
    if bool((num_runs != 1).any()):
        _raise_response_mask_error(num_runs)


def check_contiguous(name: str, mask: torch.Tensor, validate: bool = True) -> None:
    """[batch, seq] bool with at most one run of True per row (an empty row is allowed; one host sync)."""
    check_bool(name, mask)
    check_2d(name, mask)
    if not validate:
        return
    many = _run_counts(mask) > 1
    if bool(many.any()):
        raise ValueError(f"{name} rows {_rows(many)} hold more than one run of True; they must be contiguous")


def check_eos_mask(eos_mask: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> None:
    """At most one EOS per row, and it is the row's last response token (one host sync when valid).

    Given a contiguous response, "the last response token" is one position per row, so a correctly placed EOS is
    also the only one.
    """
    _check_eos_mask_types(eos_mask, response_mask)
    if not validate:
        return
    misplaced = _misplaced_eos(eos_mask, response_mask)
    many = count_true(eos_mask, dim=1) > 1
    if bool(any_true(misplaced) | many.any()):
        _raise_eos_mask_error(eos_mask, misplaced)


def check_masks(response_mask: torch.Tensor, eos_mask: torch.Tensor, validate: bool = True) -> None:
    """Both segmentation masks at once (the common case), with one host sync when they are valid."""
    _check_response_mask_types(response_mask)
    _check_eos_mask_types(eos_mask, response_mask)
    if not validate:
        return
    num_runs = _run_counts(response_mask)
    misplaced = _misplaced_eos(eos_mask, response_mask)
    # With exactly one run per row, an EOS on the last response token is the row's only EOS.
    if not bool((num_runs != 1).any() | any_true(misplaced)):
        return
    if bool((num_runs != 1).any()):
        _raise_response_mask_error(num_runs)
    _raise_eos_mask_error(eos_mask, misplaced)


def check_ends(ends: torch.Tensor, response_mask: torch.Tensor | None = None, validate: bool = True) -> None:
    """A segment-end mask: [batch, seq] bool, only on response tokens, at least one end per row (one sync if valid)."""
    check_bool("ends", ends)
    check_2d("ends", ends)
    if response_mask is not None:
        check_shape("ends", ends, response_mask.shape, "response_mask")
    if not validate:
        return
    none = ~any_true(ends, dim=1)
    outside = any_true(ends & ~response_mask, dim=1) if response_mask is not None else torch.zeros_like(none)
    if not bool((none | outside).any()):
        return
    if bool(outside.any()):
        raise ValueError(f"ends rows {_rows(outside)} mark segment ends outside the response")
    raise ValueError(f"ends rows {_rows(none)} have no segment end; every response needs at least one segment")
