"""Integer alignment helpers used throughout the block layer."""


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
