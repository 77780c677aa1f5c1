"""Integer helpers for launch grids and tile sizes, in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are `constexpr_function` wrappers
(usable inside kernels too); called from a launcher they cost the host a few
µs each, and a forward+backward makes a dozen such calls. These are the same
functions on plain ints.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def split_units(units: int, programs_per_split: int, target_programs: int) -> tuple[int, int]:
    """(splits, units per split) for a reduction over `units` work units cut into splits, each
    split run by `programs_per_split` programs, about `target_programs` in all: every split
    gets at least one unit, the last may get fewer. Needs units >= 1."""
    splits = max(1, min(units, cdiv(target_programs, programs_per_split)))
    per_split = cdiv(units, splits)
    return cdiv(units, per_split), per_split
