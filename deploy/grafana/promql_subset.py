"""The part of PromQL the lipsync-worker dashboard uses: parse it, list what it selects, evaluate it.

Not Prometheus, and not a dependency of the worker: the dashboard's test
(tests/unit/test_dashboard.py) parses every panel's query with it, checks the metric and label names
against a real scrape and evaluates the query on real scrapes; ``render_preview.py`` draws the
dashboard's preview from the same evaluation. A query outside this subset is refused with the
reason, so the dashboard stays checkable.

The subset:

* numbers; selectors ``name{label="v", label!="v", label=~"re", label!~"re"}``, with a range
  ``[5m]`` (``s``, ``m``, ``h``, ``d``) or a Grafana interval variable (``[$__rate_interval]``,
  ``$__interval``, ``$__range``) after them;
* ``rate``, ``increase``, ``delta`` of a range selector; ``histogram_quantile(φ, v)``,
  ``clamp_min(v, s)``, ``clamp_max(v, s)``;
* ``sum``, ``avg``, ``min``, ``max``, ``count``, with ``by (…)`` or ``without (…)`` before or after
  the parenthesis;
* ``+ - * /`` between numbers and instant vectors (one-to-one matching on all labels but the name,
  as Prometheus does without ``on``/``ignoring``), with the usual precedence; parentheses.

Evaluation is simplified where Prometheus is not needed for a check or a preview: ``rate`` is the
counter's increase between the first and the last sample in the range (resets handled) divided by
the time between them, without Prometheus' extrapolation to the range's edges; ``increase`` is that
rate times the range; ``histogram_quantile`` interpolates linearly inside a bucket as Prometheus does.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AGGREGATIONS",
    "FUNCTIONS",
    "Aggregate",
    "Binary",
    "Call",
    "Expr",
    "Matcher",
    "Number",
    "PromQLError",
    "Sample",
    "Scrape",
    "Selector",
    "Series",
    "duration_seconds",
    "evaluate",
    "parse",
    "selectors",
]


class PromQLError(ValueError):
    """A query this subset cannot parse (a syntax error, or PromQL it does not cover)."""


# -- syntax tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # = != =~ !~
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        found = labels.get(self.label, "")
        if self.op == "=":
            return found == self.value
        if self.op == "!=":
            return found != self.value
        hit = re.fullmatch(self.value, found) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...] = ()
    #: The range of a range selector, as written (``5m``, ``$__rate_interval``); None: instant.
    range: str | None = None


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Aggregate:
    op: str
    expr: Expr
    labels: tuple[str, ...] = ()
    without: bool = False


@dataclass(frozen=True)
class Binary:
    op: str
    lhs: Expr
    rhs: Expr


Expr = Number | Selector | Call | Aggregate | Binary

AGGREGATIONS = frozenset({"sum", "avg", "min", "max", "count"})
#: Function -> the kinds of its arguments: "range" (a range selector), "vector", "scalar".
FUNCTIONS: dict[str, tuple[str, ...]] = {
    "rate": ("range",),
    "increase": ("range",),
    "delta": ("range",),
    "histogram_quantile": ("scalar", "vector"),
    "clamp_min": ("vector", "scalar"),
    "clamp_max": ("vector", "scalar"),
}
#: Grafana's interval variables, allowed as a range.
GRAFANA_RANGES = frozenset({"$__rate_interval", "$__interval", "$__range"})

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<range>\[[^\]]*\])
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/(){},=<>^%])
    """,
    re.VERBOSE,
)


# -- parsing -------------------------------------------------------------------------------------------


def parse(query: str) -> Expr:
    """The syntax tree of ``query``; :class:`PromQLError` if it is not valid PromQL in this subset."""
    parser = _Parser(_tokens(query), query)
    expr = parser.expression()
    if parser.peek() is not None:
        raise PromQLError(f"unexpected {parser.peek()!r} in {query!r}")
    _check_kinds(expr, "vector", query)
    return expr


def selectors(expr: Expr) -> list[Selector]:
    """Every selector in ``expr``, in order."""
    if isinstance(expr, Selector):
        return [expr]
    if isinstance(expr, Call):
        return [s for arg in expr.args for s in selectors(arg)]
    if isinstance(expr, Aggregate):
        return selectors(expr.expr)
    if isinstance(expr, Binary):
        return selectors(expr.lhs) + selectors(expr.rhs)
    return []


def _tokens(query: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(query):
        match = _TOKEN.match(query, position)
        if match is None:
            raise PromQLError(f"cannot read {query[position:]!r} in {query!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], query: str) -> None:
        self.tokens = tokens
        self.position = 0
        self.query = query

    def peek(self) -> str | None:
        return self.tokens[self.position][1] if self.position < len(self.tokens) else None

    def kind(self) -> str | None:
        return self.tokens[self.position][0] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None:
            raise PromQLError(
                f"unexpected end of {self.query!r}" + (f", expected {expected!r}" if expected else "")
            )
        if expected is not None and token != expected:
            raise PromQLError(f"expected {expected!r}, found {token!r} in {self.query!r}")
        self.position += 1
        return token

    # expression := term (("+" | "-") term)*
    def expression(self) -> Expr:
        expr = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            expr = Binary(op, expr, self.term())
        return expr

    # term := unary (("*" | "/") unary)*
    def term(self) -> Expr:
        expr = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            expr = Binary(op, expr, self.unary())
        return expr

    def unary(self) -> Expr:
        if self.peek() == "-":
            self.take()
            return Binary("*", Number(-1.0), self.unary())
        return self.primary()

    def primary(self) -> Expr:
        kind, word = self.kind(), self.peek()
        if word is None:
            raise PromQLError(f"unexpected end of {self.query!r}")
        if kind == "op" and word == "(":
            self.take()
            expr = self.expression()
            self.take(")")
            return expr
        if kind == "number":
            self.take()
            return Number(float(word))
        if kind != "name":
            raise PromQLError(f"unexpected {word!r} in {self.query!r}")
        self.take()
        if word in AGGREGATIONS:
            return self.aggregation(word)
        if self.peek() == "(":
            return self.call(word)
        if word in FUNCTIONS or word in ("by", "without", "on", "ignoring", "offset"):
            raise PromQLError(f"{word!r} used as a metric name in {self.query!r}")
        return self.selector(word)

    def aggregation(self, op: str) -> Aggregate:
        labels: tuple[str, ...] = ()
        without = False
        grouped = False
        if self.peek() in ("by", "without"):
            without = self.take() == "without"
            labels, grouped = self.label_list(), True
        self.take("(")
        expr = self.expression()
        self.take(")")
        if self.peek() in ("by", "without"):
            if grouped:
                raise PromQLError(f"{op}: two groupings in {self.query!r}")
            without = self.take() == "without"
            labels = self.label_list()
        return Aggregate(op, expr, labels, without)

    def label_list(self) -> tuple[str, ...]:
        self.take("(")
        labels: list[str] = []
        while self.peek() != ")":
            label = self.take()
            if not _LABEL.fullmatch(label):
                raise PromQLError(f"bad label name {label!r} in {self.query!r}")
            labels.append(label)
            if self.peek() != ")":
                self.take(",")
        self.take(")")
        return tuple(labels)

    def call(self, function: str) -> Call:
        if function not in FUNCTIONS:
            raise PromQLError(f"function {function!r} is not in this subset ({self.query!r})")
        self.take("(")
        args: list[Expr] = []
        while self.peek() != ")":
            args.append(self.expression())
            if self.peek() != ")":
                self.take(",")
        self.take(")")
        if len(args) != len(FUNCTIONS[function]):
            raise PromQLError(f"{function} takes {len(FUNCTIONS[function])} arguments ({self.query!r})")
        return Call(function, tuple(args))

    def selector(self, name: str) -> Selector:
        matchers: list[Matcher] = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label = self.take()
                if not _LABEL.fullmatch(label):
                    raise PromQLError(f"bad label name {label!r} in {self.query!r}")
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher {op!r} in {self.query!r}")
                if self.kind() != "string":
                    raise PromQLError(f"label {label}: value must be a quoted string in {self.query!r}")
                value = _unquote(self.take())
                if op in ("=~", "!~"):
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise PromQLError(f"bad regex {value!r} in {self.query!r}: {exc}") from exc
                matchers.append(Matcher(label, op, value))
                if self.peek() != "}":
                    self.take(",")
            self.take("}")
        window: str | None = None
        if self.kind() == "range":
            window = self.take()[1:-1].strip()
            if window not in GRAFANA_RANGES and not _is_duration(window):
                raise PromQLError(f"bad range [{window}] in {self.query!r}")
        return Selector(name, tuple(matchers), window)


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def _is_duration(text: str) -> bool:
    return bool(text) and _DURATION.sub("", text) == "" and _DURATION.match(text) is not None


def duration_seconds(text: str) -> float:
    """``1h30m`` -> 5400.0."""
    if not _is_duration(text):
        raise PromQLError(f"not a duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(text))


def _kind(expr: Expr) -> str:
    if isinstance(expr, Number):
        return "scalar"
    if isinstance(expr, Selector) and expr.range is not None:
        return "range"
    if isinstance(expr, Binary) and _kind(expr.lhs) == _kind(expr.rhs) == "scalar":
        return "scalar"
    return "vector"


def _check_kinds(expr: Expr, wanted: str, query: str) -> None:
    """Range vectors only as the argument of a function that takes one; scalars where wanted."""
    kind = _kind(expr)
    if wanted == "vector" and kind == "range":
        raise PromQLError(f"a range vector where an instant vector is needed in {query!r}")
    if wanted == "range" and kind != "range":
        raise PromQLError(f"a range vector is needed in {query!r}")
    if wanted == "scalar" and kind != "scalar":
        raise PromQLError(f"a number is needed in {query!r}")
    if isinstance(expr, Call):
        for arg, arg_kind in zip(expr.args, FUNCTIONS[expr.function], strict=True):
            _check_kinds(arg, arg_kind, query)
    elif isinstance(expr, Aggregate):
        _check_kinds(expr.expr, "vector", query)
    elif isinstance(expr, Binary):
        _check_kinds(expr.lhs, "vector", query)
        _check_kinds(expr.rhs, "vector", query)


# -- evaluation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Scrape:
    """One scrape: when (seconds) and what it returned."""

    time: float
    samples: Sequence[Sample]


#: An instant vector: label set (``__name__`` included while a series keeps its name) -> value.
Series = dict[frozenset[tuple[str, str]], float]


def evaluate(expr: Expr, history: Sequence[Scrape], *, ranges: Mapping[str, float] | None = None) -> Series:
    """``expr`` at the time of the last scrape of ``history`` (earlier scrapes feed range selectors).

    ``ranges`` gives Grafana's interval variables in seconds (``{"$__rate_interval": 60}``).
    """
    if not history:
        return {}
    return _Evaluator(history, dict(ranges or {})).vector(expr)


class _Evaluator:
    def __init__(self, history: Sequence[Scrape], ranges: dict[str, float]) -> None:
        self.history = history
        self.ranges = ranges
        self.now = history[-1].time

    def scalar(self, expr: Expr) -> float:
        if isinstance(expr, Number):
            return expr.value
        if isinstance(expr, Binary):
            return _apply(expr.op, self.scalar(expr.lhs), self.scalar(expr.rhs))
        raise PromQLError("a number is needed")

    def vector(self, expr: Expr) -> Series:
        if isinstance(expr, Selector):
            return {_key(s): s.value for s in self.history[-1].samples if _selects(expr, s)}
        if isinstance(expr, Call):
            return self.call(expr)
        if isinstance(expr, Aggregate):
            return _aggregate(expr, self.vector(expr.expr))
        if isinstance(expr, Binary):
            return self.binary(expr)
        raise PromQLError("an instant vector is needed")

    def window(self, selector: Selector) -> dict[frozenset[tuple[str, str]], list[tuple[float, float]]]:
        assert selector.range is not None
        if selector.range in GRAFANA_RANGES:
            if selector.range not in self.ranges:
                raise PromQLError(f"no value given for {selector.range}")
            seconds = self.ranges[selector.range]
        else:
            seconds = duration_seconds(selector.range)
        points: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for scrape in self.history:
            if self.now - seconds < scrape.time <= self.now:
                for sample in scrape.samples:
                    if _selects(selector, sample):
                        points.setdefault(_key(sample), []).append((scrape.time, sample.value))
        return points

    def call(self, call: Call) -> Series:
        function, args = call.function, call.args
        if function in ("rate", "increase", "delta"):
            selector = args[0]
            assert isinstance(selector, Selector)
            result: Series = {}
            for key, points in self.window(selector).items():
                if len(points) < 2 or points[-1][0] <= points[0][0]:
                    continue
                span = points[-1][0] - points[0][0]
                if function == "delta":
                    result[_drop_name(key)] = points[-1][1] - points[0][1]
                    continue
                rate = _counter_increase(points) / span
                assert selector.range is not None
                seconds = self.ranges.get(selector.range) or duration_seconds(selector.range)
                result[_drop_name(key)] = rate if function == "rate" else rate * seconds
            return result
        if function == "histogram_quantile":
            return _histogram_quantile(self.scalar(args[0]), self.vector(args[1]))
        bound = self.scalar(args[1])
        pick: Callable[[float, float], float] = max if function == "clamp_min" else min
        return {_drop_name(key): pick(value, bound) for key, value in self.vector(args[0]).items()}

    def binary(self, expr: Binary) -> Series:
        lhs_scalar, rhs_scalar = _kind(expr.lhs) == "scalar", _kind(expr.rhs) == "scalar"
        if lhs_scalar:
            number = self.scalar(expr.lhs)
            return {_drop_name(k): _apply(expr.op, number, v) for k, v in self.vector(expr.rhs).items()}
        if rhs_scalar:
            number = self.scalar(expr.rhs)
            return {_drop_name(k): _apply(expr.op, v, number) for k, v in self.vector(expr.lhs).items()}
        right = {_drop_name(k): v for k, v in self.vector(expr.rhs).items()}
        result: Series = {}
        for key, value in self.vector(expr.lhs).items():
            matched = _drop_name(key)
            if matched in right:
                result[matched] = _apply(expr.op, value, right[matched])
        return result


def _key(sample: Sample) -> frozenset[tuple[str, str]]:
    return frozenset({**sample.labels, "__name__": sample.name}.items())


def _drop_name(key: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in key if k != "__name__")


def _selects(selector: Selector, sample: Sample) -> bool:
    return sample.name == selector.name and all(m.matches(sample.labels) for m in selector.matchers)


def _counter_increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, before), (_, after) in itertools.pairwise(points):
        total += after - before if after >= before else after  # a reset starts again from zero
    return total


def _apply(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:  # as Prometheus: x/0 is ±Inf, 0/0 is NaN
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _aggregate(agg: Aggregate, series: Series) -> Series:
    groups: dict[frozenset[tuple[str, str]], list[float]] = {}
    for key, value in series.items():
        if agg.without:
            group = frozenset((k, v) for k, v in key if k not in agg.labels and k != "__name__")
        else:
            group = frozenset((k, v) for k, v in key if k in agg.labels)
        groups.setdefault(group, []).append(value)
    reducers: dict[str, Callable[[list[float]], float]] = {
        "sum": sum,
        "avg": lambda values: sum(values) / len(values),
        "min": min,
        "max": max,
        "count": lambda values: float(len(values)),
    }
    return {group: reducers[agg.op](values) for group, values in groups.items()}


def _histogram_quantile(q: float, buckets: Series) -> Series:
    """Prometheus' algorithm: find the bucket holding rank q·count, interpolate linearly inside it."""
    by_series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for key, value in buckets.items():
        labels = dict(key)
        if "le" not in labels:
            continue
        rest = frozenset((k, v) for k, v in key if k not in ("le", "__name__"))
        by_series.setdefault(rest, []).append((float(labels["le"]), value))
    result: Series = {}
    for key, points in by_series.items():
        points.sort()
        if not points or points[-1][0] != math.inf or len(points) < 2:
            result[key] = math.nan
            continue
        if q < 0 or q > 1:
            result[key] = -math.inf if q < 0 else math.inf
            continue
        total = points[-1][1]
        if total <= 0 or math.isnan(total):
            result[key] = math.nan
            continue
        rank = q * total
        index = next(i for i, (_, count) in enumerate(points) if count >= rank)
        if index == len(points) - 1:
            result[key] = points[-2][0]
            continue
        upper, count = points[index]
        lower, below = (0.0, 0.0) if index == 0 else points[index - 1]
        if index == 0 and upper <= 0:
            result[key] = upper
            continue
        in_bucket = count - below
        result[key] = upper if in_bucket <= 0 else lower + (upper - lower) * (rank - below) / in_bucket
    return result
