"""Shared-memory bank-conflict model: wavefronts of one warp-wide shared-memory instruction.

Given the byte address each lane of a warp touches in ONE instruction and the access width, count
the wavefronts (passes through the 32 banks) the way Nsight Compute counts them
(``l1tex__data_pipe_lsu_wavefronts_mem_shared*`` and ``l1tex__data_bank_conflicts_pipe_lsu_mem_shared*``):

* shared memory is 32 banks of 4 bytes; the 4-byte word at byte address ``a`` is word ``a // 4``,
  in bank ``(a // 4) % 32``;
* a warp is served in phases: one phase of 32 lanes for 1-, 2- and 4-byte accesses, 2 phases of 16
  lanes (half-warps) for 8-byte accesses, 4 phases of 8 lanes (quarter-warps) for 16-byte accesses,
  so that each phase moves at most 128 bytes. A phase with an active lane is one "ideal" wavefront;
* within a phase, lanes touching the SAME word are served together (broadcast on loads, one write
  on stores); distinct words of one bank are served one per wavefront, so a phase takes
  ``max over banks of (distinct words in that bank)`` wavefronts;
* ``conflicts = wavefronts - ideal``.

Loads (``load=True``) follow one more rule, measured on an H100 with Nsight Compute (655 single-
instruction probes, tests/test_banks.py): for an 8- or 16-byte ``ld.shared`` in which every pair of
lanes (2k, 2k + 1) reads one address (inactive lanes aside), the pair counts as one requester, so
the 16 requesters fill one phase (8 bytes) or two (16 bytes), e.g. a 16-byte broadcast takes 2
wavefronts, not 4. Stores never merge. With that rule the model matched every probe exactly (stores,
loads of 1-16 bytes, active masks, ``ldmatrix``); for ``ldmatrix`` rows repeated in lane pairs were not
probed.

``ldmatrix.x1/.x2/.x4`` reads 1/2/4 matrices of 8 rows x 16 bytes; lanes 8i..8i+7 give the row
addresses of matrix i, and each matrix is one phase of 8 rows x 16 bytes (``.x4``: ideally 4
wavefronts). ``.trans`` and ``stmatrix`` touch the same bytes and count the same.

Counts add up and scale: ``Wavefronts`` supports ``+`` and ``* executions``, so a whole launch is
``sum(count * executions for each instruction)`` (see :func:`total`), counts that ncu reports
summed over all warps of all blocks.

Example, AutoAWQ's activation store (16 bytes per lane, rows of 80 bytes)::

    >>> lane = np.arange(32)
    >>> count_wavefronts(80 * (lane // 4) + 16 * (lane % 4), 16)
    Wavefronts(wavefronts=8, ideal=4, conflicts=4)
"""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

WARP = 32                 # lanes per warp
BANKS = 32                # shared-memory banks
BANK_BYTES = 4            # bytes per bank word
PHASE_BYTES = BANKS * BANK_BYTES     # 128 bytes served per wavefront at most
WIDTHS = (1, 2, 4, 8, 16)            # access widths in bytes of one lane's ld/st.shared
LDMATRIX_NUMS = (1, 2, 4)            # .x1, .x2, .x4
LDMATRIX_ROWS = 8                    # rows of one 8x8 b16 matrix
LDMATRIX_ROW_BYTES = 16              # 8 halfs


class Wavefronts:
    """Wavefront counts of one instruction, or summed over many.

    ``wavefronts``: passes through the banks; ``ideal``: the phases with an active lane (the
    wavefronts without any conflict); ``conflicts = wavefronts - ideal``. The fields are Python ints,
    or equal-shape int64 NumPy arrays (one entry per instruction) from the ``*_many`` functions;
    ``sum()`` turns those into ints. ``a + b`` adds counts and ``count * n`` scales by an execution
    count. Unpacks as ``wavefronts, ideal, conflicts = count``.
    """

    __slots__ = ("wavefronts", "ideal")

    def __init__(self, wavefronts, ideal):
        self.wavefronts = wavefronts
        self.ideal = ideal

    @property
    def conflicts(self):
        return self.wavefronts - self.ideal

    def __iter__(self):
        return iter((self.wavefronts, self.ideal, self.conflicts))

    def __add__(self, other):
        if not isinstance(other, Wavefronts):
            return NotImplemented
        return Wavefronts(self.wavefronts + other.wavefronts, self.ideal + other.ideal)

    def __radd__(self, other):          # lets sum() start from 0
        if isinstance(other, (int, np.integer)) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, executions):
        if isinstance(executions, Wavefronts):
            return NotImplemented
        return Wavefronts(self.wavefronts * executions, self.ideal * executions)

    __rmul__ = __mul__

    def __eq__(self, other):
        if not isinstance(other, Wavefronts):
            return NotImplemented
        return bool(np.all(self.wavefronts == other.wavefronts) and np.all(self.ideal == other.ideal))

    __hash__ = None

    def sum(self) -> "Wavefronts":
        """Totals over all instructions of a ``*_many`` result, as Python ints."""
        return Wavefronts(int(np.sum(self.wavefronts)), int(np.sum(self.ideal)))

    def as_dict(self) -> dict:
        """{"wavefronts", "ideal", "conflicts"} (ints or lists), e.g. for JSON."""
        conv = (lambda v: v.tolist() if isinstance(v, np.ndarray) else int(v))
        return {"wavefronts": conv(self.wavefronts), "ideal": conv(self.ideal),
                "conflicts": conv(self.conflicts)}

    def __repr__(self):
        return (f"Wavefronts(wavefronts={self.wavefronts!r}, ideal={self.ideal!r}, "
                f"conflicts={self.conflicts!r})")


def lanes_per_phase(width: int) -> int:
    """Lanes served together in one phase for an access of ``width`` bytes: 32, 32, 32, 16 or 8."""
    _check_width(width)
    return PHASE_BYTES // max(width, BANK_BYTES)


def bank_of(address) -> np.ndarray:
    """Bank of each byte address: ``(address // 4) % 32`` (same shape as ``address``)."""
    return (np.asarray(address, np.int64) // BANK_BYTES) % BANKS


# ------------------------------------------------------------------------------------ validation
def _check_width(width):
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or int(width) not in WIDTHS:
        raise ValueError(f"width={width!r} bytes is not a shared-memory access width; use one of {WIDTHS}")
    return int(width)


def _as_lane_array(name: str, values, n_lanes: int) -> np.ndarray:
    """(n, n_lanes) int64 from a (n_lanes,) or (n, n_lanes) integer array-like."""
    arr = np.asarray(values)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[-1] != n_lanes:
        raise ValueError(f"{name} must have {n_lanes} lanes in its last axis (shape ({n_lanes},) or "
                         f"(n, {n_lanes})), got shape {arr.shape}")
    return arr.astype(np.int64).reshape(-1, n_lanes)


def _as_active(active, shape) -> np.ndarray:
    if active is None:
        return np.ones(shape, bool)
    act = np.asarray(active)
    if act.dtype != bool:
        raise ValueError(f"active must be a boolean lane mask, got dtype {act.dtype}")
    if act.ndim not in (1, 2) or act.shape[-1] != shape[-1]:
        raise ValueError(f"active must have {shape[-1]} lanes in its last axis, got shape {act.shape}")
    try:
        return np.broadcast_to(act.reshape(-1, shape[-1]), shape)
    except ValueError:
        raise ValueError(f"active has shape {act.shape}, which does not match the addresses' "
                         f"{shape}") from None


def _check_addresses(addr: np.ndarray, active: np.ndarray, width: int, what: str = "width"):
    bad = active & ((addr < 0) | (addr % width != 0))
    if bad.any():
        inst, lane = (int(i) for i in np.argwhere(bad)[0])
        where = f"lane {lane}" if addr.shape[0] == 1 else f"instruction {inst}, lane {lane}"
        value = int(addr[inst, lane])
        rule = "is negative" if value < 0 else f"is not aligned to {what}={width} bytes"
        raise ValueError(f"{where}: address {value} {rule}")


# ----------------------------------------------------------------------------------------- model
def _merge_load_pairs(addr: np.ndarray, active: np.ndarray, width: int):
    """Loads of 8/16 bytes whose lane pairs (2k, 2k + 1) share an address: one requester per pair,
    placed in lanes 0-15 (lanes 16-31 inactive), so that the usual phases apply to the pairs."""
    if width < 8:
        return addr, active
    n = addr.shape[0]
    a, m = addr.reshape(n, WARP // 2, 2), active.reshape(n, WARP // 2, 2)
    merge = ~(m[..., 0] & m[..., 1] & (a[..., 0] != a[..., 1])).any(axis=1)
    pairs = np.concatenate([np.where(m[..., 0], a[..., 0], a[..., 1]),
                            np.zeros((n, WARP // 2), np.int64)], axis=1)
    pairs_active = np.concatenate([m.any(axis=2), np.zeros((n, WARP // 2), bool)], axis=1)
    return (np.where(merge[:, None], pairs, addr), np.where(merge[:, None], pairs_active, active))


def _count(addr: np.ndarray, active: np.ndarray, width: int) -> Wavefronts:
    """Core of the model on validated (n, 32) int64 addresses and (n, 32) bool mask."""
    n = addr.shape[0]
    lanes = PHASE_BYTES // max(width, BANK_BYTES)
    phases = WARP // lanes
    words_per_lane = max(width // BANK_BYTES, 1)
    # Every 4-byte word each lane touches, -1 for inactive lanes; grouped by phase.
    words = (addr // BANK_BYTES)[:, :, None] + np.arange(words_per_lane)
    words = np.where(active[:, :, None], words, -1).reshape(n * phases, lanes * words_per_lane)
    words.sort(axis=1)
    distinct = words >= 0
    distinct[:, 1:] &= words[:, 1:] != words[:, :-1]      # first occurrence of each word
    # Distinct words per (instruction, phase, bank); the busiest bank sets the phase's wavefronts.
    slot = np.arange(n * phases)[:, None] * BANKS + words % BANKS
    per_bank = np.bincount(slot[distinct], minlength=n * phases * BANKS).reshape(n, phases, BANKS)
    wavefronts = per_bank.max(axis=2).sum(axis=1).astype(np.int64)
    ideal = active.reshape(n, phases, lanes).any(axis=2).sum(axis=1).astype(np.int64)
    return Wavefronts(wavefronts, ideal)


def count_wavefronts_many(addresses, width: int, active=None, *, load: bool = False) -> Wavefronts:
    """Wavefronts of n warp-wide shared-memory instructions at once.

    addresses: (n, 32) integer byte addresses (a (32,) array counts as n = 1), lane i in column i.
    width: bytes per lane, one of 1, 2, 4, 8, 16 (all n instructions share it).
    active: optional bool mask, (32,) for all instructions or (n, 32); inactive lanes are ignored
        (their addresses need not be valid).
    load: True for ``ld.shared`` (8/16-byte lane pairs on one address merge, see the module
        docstring), False for ``st.shared``.
    Returns Wavefronts whose fields are (n,) int64 arrays; ``.sum()`` totals them.
    Raises ValueError for a bad width, shape, dtype, or a negative or misaligned active address.
    """
    width = _check_width(width)
    addr = _as_lane_array("addresses", addresses, WARP)
    active = _as_active(active, addr.shape)
    _check_addresses(addr, active, width)
    if load:
        addr, active = _merge_load_pairs(addr, active, width)
    return _count(addr, active, width)


def count_wavefronts(addresses, width: int, active=None, *, load: bool = False) -> Wavefronts:
    """Wavefronts, ideal wavefronts and bank conflicts of ONE warp-wide shared-memory instruction.

    addresses: (32,) integer byte addresses in shared memory, one per lane (lane i at index i).
    width: bytes each lane loads or stores: 1, 2, 4, 8 (``.v2.b32``/``.b64``) or 16 (``.v4.b32``).
    active: optional (32,) bool mask of the lanes that execute the instruction.
    load: True for a load (``ld.shared``), False (default) for a store.
    Returns Wavefronts with int fields.
    """
    addr = np.asarray(addresses)
    if addr.ndim != 1:
        raise ValueError(f"addresses must have shape (32,) for one instruction, got {addr.shape}; "
                         "use count_wavefronts_many for (n, 32)")
    if active is not None and np.ndim(active) != 1:
        raise ValueError(f"active must have shape (32,), got {np.shape(active)}")
    many = count_wavefronts_many(addr, width, active, load=load)
    return Wavefronts(int(many.wavefronts[0]), int(many.ideal[0]))


def _ldmatrix_lanes(row_addresses, num: int):
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or int(num) not in LDMATRIX_NUMS:
        raise ValueError(f"num={num!r} matrices is not an ldmatrix shape; use one of {LDMATRIX_NUMS} "
                         "(.x1, .x2, .x4)")
    num = int(num)
    rows = num * LDMATRIX_ROWS
    arr = np.asarray(row_addresses)
    n_lanes = arr.shape[-1] if arr.ndim in (1, 2) else -1
    if n_lanes not in (rows, WARP):
        raise ValueError(f"row_addresses must give {rows} row addresses (lanes 0-{rows - 1}) or one "
                         f"per lane (32) in its last axis for ldmatrix.x{num}, got shape {arr.shape}")
    addr = _as_lane_array("row_addresses", arr, n_lanes)
    if n_lanes < WARP:
        addr = np.concatenate([addr, np.zeros((addr.shape[0], WARP - n_lanes), np.int64)], axis=1)
    active = np.broadcast_to(np.arange(WARP) < rows, addr.shape)
    _check_addresses(addr, active, LDMATRIX_ROW_BYTES, what="the row size")
    return addr, active


def count_ldmatrix_many(row_addresses, num: int) -> Wavefronts:
    """Wavefronts of n ``ldmatrix.sync.aligned.m8n8.x{num}.shared.b16`` instructions.

    row_addresses: (n, 32) or (n, 8 * num) integer byte addresses; lane 8i + r gives row r of
        matrix i (lanes from 8 * num on are ignored). Each row is 16 bytes, 16-byte aligned.
    num: 1, 2 or 4 matrices. Each matrix is one phase (8 rows x 16 bytes), so ideal = num.
    Returns Wavefronts with (n,) int64 arrays.
    """
    addr, active = _ldmatrix_lanes(row_addresses, num)
    return _count(addr, active, LDMATRIX_ROW_BYTES)


def count_ldmatrix(row_addresses, num: int) -> Wavefronts:
    """Wavefronts of ONE ``ldmatrix.x{num}`` (or ``stmatrix``) instruction.

    row_addresses: (32,) or (8 * num,) integer byte addresses, lane 8i + r = row r of matrix i.
    num: 1, 2 or 4. Returns Wavefronts with int fields (ideal = num).
    """
    if np.ndim(row_addresses) != 1:
        raise ValueError(f"row_addresses must be 1-D for one instruction, got shape "
                         f"{np.shape(row_addresses)}; use count_ldmatrix_many")
    many = count_ldmatrix_many(row_addresses, num)
    return Wavefronts(int(many.wavefronts[0]), int(many.ideal[0]))


def total(counts_and_executions: Iterable[Tuple[Wavefronts, object]]) -> Wavefronts:
    """Sum of ``count * executions`` over (Wavefronts, executions) pairs, as ints.

    This is how a launch's totals follow from per-instruction counts: executions is how many
    times (warps x loop trips) the instruction runs in one launch; a count from a ``*_many``
    function pairs with a scalar or an (n,) array of executions.
    """
    out = Wavefronts(0, 0)
    for count, executions in counts_and_executions:
        out = out + (count * executions).sum()
    return out
