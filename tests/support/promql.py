"""Just enough PromQL to list what an expression reads: the metric names, the labels each selector
matches on, and the labels named in by/without/on/ignoring/group_* clauses. Pure: text in, names out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![A-Za-z0-9_:]))
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>[{}()\[\],])
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregations may put their by/without clause before the parenthesis: `sum by (x) (...)`.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
_AGGREGATIONS |= {"quantile", "limitk", "limit_ratio"}
_KEYWORDS = _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
# Grafana's variables ($__rate_interval, ${datasource}, $namespace) stand where a duration or a
# label value goes; a duration parses in both places.
_GRAFANA_VARIABLE = re.compile(r"\$\{\w+\}|\$\w+")


class PromQLError(ValueError):
    pass


@dataclass
class Reads:
    metrics: dict[str, set[str]] = field(default_factory=dict)  # metric name -> labels its matchers use
    grouping_labels: set[str] = field(default_factory=set)


def reads(expr: str) -> Reads:
    tokens = _tokens(_GRAFANA_VARIABLE.sub("5m", expr))
    found = Reads()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "punct" and text == "[":  # a range or a subquery's step: durations only
            i = _index(tokens, i, "]") + 1
            continue
        if kind == "punct" and text == "{":
            raise PromQLError(f"a selector without a metric name in {expr!r}")
        if kind != "name":
            i += 1
            continue
        if text in _GROUPING and following == "(":
            end = _index(tokens, i, ")")
            found.grouping_labels |= {t for k, t in tokens[i + 2 : end] if k == "name"}
            i = end + 1
        elif following == "(" or text in _KEYWORDS:  # a function call, or an operator spelled as a word
            i += 1
        else:
            labels = found.metrics.setdefault(text, set())
            i += 1
            if following == "{":
                end = _index(tokens, i, "}")
                labels |= {t for k, t in tokens[i + 1 : end] if k == "name"}
                i = end + 1
    return found


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise PromQLError(f"cannot read {expr[at : at + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
        at = match.end()
    return out


def _index(tokens: list[tuple[str, str]], start: int, closing: str) -> int:
    for j in range(start, len(tokens)):
        if tokens[j] == ("punct", closing):
            return j
    raise PromQLError(f"no {closing!r} after token {start}")
