"""The one JSON line every benchmark ends with, and the goal strings it carries.

    {"benchmark": NAME, "ratios": {...}, "goals": {...}, "met": {...}, "figures": {...}, "threads": N}

`ratios` holds the measured ratios (None when one could not be measured), `goals` the goal of a ratio as a
string ("<= 0.9", ">= 0.5"), `met` whether each goal's ratio satisfies it, `figures` the raw timings and
memory. A ratio may have no goal (shown as "-"); a goal whose ratio is missing is not met. A benchmark that
cannot run at all says why in "skipped" (and has no ratios) instead of failing. `benchmarks/run_all.py`
reads the last stdout line of each benchmark as this object.
"""

from __future__ import annotations

import json
import math
import operator
import re
import statistics

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def paired_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, list[float]]:
    """The median over rounds of each round's numerator / denominator, and its spread [lowest, highest].

    Each round times both sides back to back, so a change in the machine's speed between rounds cancels
    out of that round's ratio; a ratio of the two medians would not cancel it.
    """
    rounds = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.median(rounds), [min(rounds), max(rounds)]


def parse_goal(goal: str) -> tuple[str, float]:
    """'<= 0.9' -> ('<=', 0.9)."""
    match = _GOAL.match(goal)
    if not match:
        raise ValueError(f"not a goal: {goal!r} (expected e.g. '<= 0.9' or '>= 0.5')")
    return match.group(1), float(match.group(2))


def goal_met(value: float | None, goal: str) -> bool:
    """Whether `value` satisfies `goal`; a missing or non-finite value never does."""
    op, bound = parse_goal(goal)
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return _OPS[op](value, bound)


def rounded(value, digits: int = 4):
    """Floats kept to `digits` significant digits for the JSON line (nested dicts and lists too); NaN and inf
    become None (valid JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def result(benchmark: str, ratios: dict, goals: dict[str, str], figures: dict, threads: int, **extra) -> dict:
    """The benchmark's JSON object; `met` is computed here from `ratios` and `goals`, so the two always agree."""
    ratios = rounded(dict(ratios))
    met = {name: goal_met(ratios.get(name), goal) for name, goal in goals.items()}
    return {
        "benchmark": benchmark,
        "ratios": ratios,
        "goals": dict(goals),
        "met": met,
        "figures": rounded(figures),
        "threads": threads,
        **extra,
    }


def skipped(benchmark: str, reason: str, threads: int, **extra) -> dict:
    """The JSON object of a benchmark that could not run (a missing optional package, no GPU...)."""
    return {
        "benchmark": benchmark,
        "skipped": reason,
        "ratios": {},
        "goals": {},
        "met": {},
        "figures": {},
        "threads": threads,
        **extra,
    }


def emit(obj: dict) -> None:
    """Print the JSON line: the last line of the benchmark's stdout."""
    print(json.dumps(obj), flush=True)


def check_line(obj: dict) -> list[str]:
    """Problems with a benchmark's JSON object (empty when well-formed): keys, goal strings, met consistent."""
    problems = []
    for key, kind in (
        ("benchmark", str),
        ("ratios", dict),
        ("goals", dict),
        ("met", dict),
        ("figures", dict),
        ("threads", int),
    ):
        if not isinstance(obj.get(key), kind):
            problems.append(f"{key!r} missing or not a {kind.__name__}")
    if problems:
        return problems
    for name, goal in obj["goals"].items():
        try:
            expected = goal_met(obj["ratios"].get(name), goal)
        except ValueError as err:
            problems.append(str(err))
            continue
        if name not in obj["ratios"]:
            problems.append(f"goal {name!r} has no ratio")
        if obj["met"].get(name) is not expected:
            problems.append(
                f"met[{name!r}] is {obj['met'].get(name)!r}, but {obj['ratios'].get(name)!r} {goal} is {expected}"
            )
    if set(obj["met"]) != set(obj["goals"]):
        problems.append("met and goals name different ratios")
    for name, value in obj["ratios"].items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            problems.append(f"ratio {name!r} is {value!r}, not a finite number or null")
    return problems
