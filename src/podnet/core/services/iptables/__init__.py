"""The iptables chain engine (core layer, sans-IO): nat, filter (and mangle, raw) tables walked rule
by rule as the kernel walks them, iptables-restore input, iptables-save and `iptables -L` output.

Modules: rules (data model, errors), matches / stateful (match extensions), targets, ruleparse (one
rule specification), restore (iptables-restore), save (iptables-save), listing (iptables -L),
engine (Ruleset, evaluation), trace (a first packet's way through the hooks).
"""

from .engine import VERDICT_KINDS, EvalContext, Ruleset, Verdict, Walk
from .rules import Chain, Counters, IptablesError, Rule, Table
from .stateful import RecentTables
from .trace import Outcome, outcomes_json, trace_first_packet

__all__ = [
    "VERDICT_KINDS", "Chain", "Counters", "EvalContext", "IptablesError", "Outcome", "RecentTables",
    "Rule", "Ruleset", "Table", "Verdict", "Walk", "outcomes_json", "trace_first_packet",
]
