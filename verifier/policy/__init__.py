"""Reference-value policies over replayed, digest-checked boot events (issue 5).

policy = Policy.load(path_or_bytes)        # versioned schema, frozen values
rules = rules_for(policy)                  # one all-of rule
rules.check(BootEvidence(...))             # raises PolicyViolationError with every failure
learned = learn_policy(replayed_log)       # from a known-good boot
"""

from verifier.policy.learn import learn_policy
from verifier.policy.rules import (
    AllOf,
    AnyOf,
    BootEvidence,
    EventRef,
    Failure,
    PolicyViolationError,
    Rule,
    rules_for,
)
from verifier.policy.schema import (
    BootApplication,
    CmdlinePattern,
    DbPolicy,
    DbxPolicy,
    FirmwarePolicy,
    Policy,
)

__all__ = [
    "AllOf",
    "AnyOf",
    "BootApplication",
    "BootEvidence",
    "CmdlinePattern",
    "DbPolicy",
    "DbxPolicy",
    "EventRef",
    "Failure",
    "FirmwarePolicy",
    "Policy",
    "PolicyViolationError",
    "Rule",
    "learn_policy",
    "rules_for",
]
