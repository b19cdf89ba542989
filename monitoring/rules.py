"""The monitoring actor's alert rules, as pure code.

A rule watches one windowed signal (see monitoring/signals.py) and fires when the signal has been
on the wrong side of its threshold for ``for_s`` seconds. The semantics follow Prometheus's alerting
rules in monitoring/alerts.yml, so the in-process monitor and Prometheus agree, plus two things an
actor that triggers retraining needs:

* hysteresis: once firing, a rule resolves only when the value is back past
  ``threshold -/+ hysteresis``, so a value hovering around the threshold does not flap;
* cooldown: after a fire, the rule does not fire again for ``cooldown_s`` seconds, even if it
  resolved and breached again meanwhile (it stays pending and fires when the cooldown is over).

Missing data (``None`` or NaN, e.g. no traffic in the window) never fires: a pending rule goes back
to ok, and a firing rule keeps firing (no data is no evidence that the model got better; Prometheus
would resolve it). The engine's state round-trips through ``to_dict``/``from_dict`` (JSON-safe), so a
restarted actor neither re-fires nor forgets a pending timer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from segloop.errors import ConfigError

# error_rate counts server errors (5xx) only; client_error_rate (4xx: bad input, auth, too large) is
# the callers' doing and has no default rule, but a configured one (e.g. severity info) may watch it.
Signal = Literal["mean_confidence", "mean_entropy", "error_rate", "client_error_rate"]
SIGNALS: tuple[str, ...] = ("mean_confidence", "mean_entropy", "error_rate", "client_error_rate")
STATE_VERSION = 1


class RuleConfig(BaseModel):
    """One alert rule. Times are seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    signal: Signal
    op: Literal["<", ">"]
    threshold: float
    window_s: float = Field(300.0, gt=0)
    for_s: float = Field(120.0, ge=0)
    hysteresis: float = Field(0.0, ge=0)
    cooldown_s: float = Field(0.0, ge=0)
    severity: Literal["info", "warning", "critical"] = "warning"

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("threshold must be a finite number")
        return v

    def breached(self, value: float) -> bool:
        """The firing condition (strict, like PromQL's < and >)."""
        return value < self.threshold if self.op == "<" else value > self.threshold

    def cleared(self, value: float) -> bool:
        """The resolving condition: back past the threshold by at least the hysteresis."""
        if self.op == "<":
            return value >= self.threshold + self.hysteresis
        return value <= self.threshold - self.hysteresis


# Mirrors monitoring/alerts.yml (tests/test_monitoring_config.py checks that they agree).
DEFAULT_RULES: tuple[RuleConfig, ...] = (
    RuleConfig(
        name="low_confidence",
        signal="mean_confidence",
        op="<",
        threshold=0.6,
        window_s=300,
        for_s=120,
        hysteresis=0.05,
        cooldown_s=1800,
        severity="warning",
    ),
    RuleConfig(
        name="high_entropy",
        signal="mean_entropy",
        op=">",
        threshold=0.5,
        window_s=300,
        for_s=120,
        hysteresis=0.05,
        cooldown_s=1800,
        severity="warning",
    ),
    RuleConfig(
        name="high_error_rate",
        signal="error_rate",
        op=">",
        threshold=0.05,
        window_s=300,
        for_s=120,
        hysteresis=0.02,
        cooldown_s=1800,
        severity="critical",
    ),
)

_RULE_LIST = TypeAdapter(list[RuleConfig])


def parse_rules(data: Iterable[Mapping[str, Any] | RuleConfig], source: str = "rules") -> list[RuleConfig]:
    """Validate a list of rule dicts (e.g. from YAML); ``source`` names it in the error."""
    try:
        rules = _RULE_LIST.validate_python([r.model_dump() if isinstance(r, RuleConfig) else r for r in data])
    except ValidationError as e:
        raise ConfigError(f"invalid alert rules in {source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"invalid alert rules in {source}: expected a list of mappings ({e})") from None
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"invalid alert rules in {source}: duplicate rule names {dupes}")
    return rules


@dataclass(frozen=True)
class Event:
    """A rule changed state: ``firing`` (it fired) or ``resolved``."""

    rule: str
    state: Literal["firing", "resolved"]
    value: float
    time: float
    signal: str = ""
    threshold: float = math.nan
    severity: str = "warning"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RuleState:
    """Where one rule is: ``ok`` -> ``pending`` (breached, waiting for for_s / cooldown) -> ``firing``."""

    state: Literal["ok", "pending", "firing"] = "ok"
    since: float | None = None  # when the current state was entered
    last_fired: float | None = None  # for the cooldown
    last_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuleState:
        state = d.get("state", "ok")
        if state not in ("ok", "pending", "firing"):
            raise ConfigError(f"invalid rule state {state!r}: expected ok, pending or firing")
        return cls(state=state, since=d.get("since"), last_fired=d.get("last_fired"), last_value=d.get("last_value"))


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(float(value))


class RuleEngine:
    """Evaluates rules on successive signal readings and reports state changes."""

    def __init__(self, rules: Sequence[RuleConfig | Mapping[str, Any]] | None = None) -> None:
        self._rules = parse_rules(DEFAULT_RULES if rules is None else rules)
        self._states: dict[str, RuleState] = {r.name: RuleState() for r in self._rules}

    @property
    def rules(self) -> list[RuleConfig]:
        return list(self._rules)

    def state(self, name: str) -> RuleState:
        return self._states[name]

    def firing(self) -> list[str]:
        return [r.name for r in self._rules if self._states[r.name].state == "firing"]

    def evaluate(self, signals: Mapping[str, float | None], now: float) -> list[Event]:
        """Advance every rule to time ``now`` (seconds, wall clock) given the current signal values."""
        events = []
        for rule in self._rules:
            ev = self._step(rule, self._states[rule.name], signals.get(rule.signal), float(now))
            if ev is not None:
                events.append(ev)
        return events

    def _step(self, rule: RuleConfig, st: RuleState, value: float | None, now: float) -> Event | None:
        if _missing(value):
            if st.state == "pending":
                st.state, st.since = "ok", now
            return None
        value = float(value)  # type: ignore[arg-type]
        st.last_value = value

        if st.state == "firing":
            if rule.cleared(value):
                st.state, st.since = "ok", now
                return self._event(rule, "resolved", value, now)
            return None

        if not rule.breached(value):
            if st.state == "pending":
                st.state, st.since = "ok", now
            return None

        if st.state == "ok":
            st.state, st.since = "pending", now
        held = now - (st.since if st.since is not None else now)
        cooled = st.last_fired is None or now - st.last_fired >= rule.cooldown_s
        if held >= rule.for_s and cooled:
            st.state, st.since, st.last_fired = "firing", now, now
            return self._event(rule, "firing", value, now)
        return None

    @staticmethod
    def _event(rule: RuleConfig, state: Literal["firing", "resolved"], value: float, now: float) -> Event:
        return Event(
            rule=rule.name,
            state=state,
            value=value,
            time=now,
            signal=rule.signal,
            threshold=rule.threshold,
            severity=rule.severity,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe snapshot: the rules and each rule's state."""
        return {
            "version": STATE_VERSION,
            "rules": [r.model_dump() for r in self._rules],
            "states": {name: st.to_dict() for name, st in self._states.items()},
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], rules: Sequence[RuleConfig | Mapping[str, Any]] | None = None
    ) -> RuleEngine:
        """Restore a snapshot. With ``rules``, those replace the saved rules; the states of rules that
        kept their name carry over (new rules start ok, removed ones are dropped)."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise ConfigError(
                f"cannot restore rule engine state: expected a mapping with version {STATE_VERSION}, "
                f"got {type(data).__name__} version {getattr(data, 'get', lambda _k: None)('version')!r}"
            )
        engine = cls(data.get("rules", []) if rules is None else rules)
        for name, st in dict(data.get("states", {})).items():
            if name in engine._states:
                engine._states[name] = RuleState.from_dict(st)
        return engine
