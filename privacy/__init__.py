"""Sample-level differential privacy for fedlora clients: accounting, budget planning, lifetime ledger.

Also the DP-SGD engines (Opacus' and the fused LoRA engine with its kernels) and the privacy report.
It imports nothing of ours but the leaf utilities (:mod:`fedlora.atomic`), so every role and the
core can use it.
"""

from importlib import import_module
from typing import Any

#: name -> module: resolved on first use, so ``fedlora.core.pki`` (certificates and node keys) does not
#: load Opacus, scipy and torch for commands that only handle keys
_EXPORTS = {
    "ACCOUNTANTS": "fedlora.privacy.accounting",
    "PrivacyAccountingError": "fedlora.privacy.accounting",
    "compute_epsilon": "fedlora.privacy.accounting",
    "create": "fedlora.privacy.accounting",
    "register": "fedlora.privacy.accounting",
    "LedgerConflictError": "fedlora.privacy.ledger",
    "LedgerEntry": "fedlora.privacy.ledger",
    "LedgerError": "fedlora.privacy.ledger",
    "PrivacyLedger": "fedlora.privacy.ledger",
    "BudgetPlan": "fedlora.privacy.planning",
    "default_delta": "fedlora.privacy.planning",
    "delta_warning": "fedlora.privacy.planning",
    "plan_noise": "fedlora.privacy.planning",
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
