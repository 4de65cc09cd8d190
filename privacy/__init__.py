"""Sample-level differential privacy for fedlora clients: accounting, budget planning, lifetime ledger.

Everything here is pure Python over Opacus' accountants; it imports no other package of ours, so
the client, the server and the privacy report can all use it.
"""

from importlib import import_module
from typing import Any

#: name -> module: resolved on first use, so ``privacy.keys`` (certificates and node keys) does not
#: load Opacus, scipy and torch for commands that only handle keys
_EXPORTS = {
    "ACCOUNTANTS": "privacy.accounting",
    "PrivacyAccountingError": "privacy.accounting",
    "compute_epsilon": "privacy.accounting",
    "create": "privacy.accounting",
    "register": "privacy.accounting",
    "LedgerConflictError": "privacy.ledger",
    "LedgerEntry": "privacy.ledger",
    "LedgerError": "privacy.ledger",
    "PrivacyLedger": "privacy.ledger",
    "BudgetPlan": "privacy.planning",
    "default_delta": "privacy.planning",
    "delta_warning": "privacy.planning",
    "plan_noise": "privacy.planning",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privacy' has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "BudgetPlan",
    "LedgerConflictError",
    "LedgerEntry",
    "LedgerError",
    "PrivacyAccountingError",
    "PrivacyLedger",
    "compute_epsilon",
    "create",
    "default_delta",
    "delta_warning",
    "plan_noise",
    "register",
]
