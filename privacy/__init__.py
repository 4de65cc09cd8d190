"""Sample-level differential privacy for fedlora clients: accounting, budget planning, lifetime ledger.

Everything here is pure Python over Opacus' accountants; it imports no other package of ours, so
the client, the server and the privacy report can all use it.
"""

from privacy.accounting import ACCOUNTANTS, PrivacyAccountingError, compute_epsilon, create, register
from privacy.ledger import LedgerConflictError, LedgerEntry, LedgerError, PrivacyLedger
from privacy.planning import BudgetPlan, default_delta, delta_warning, plan_noise

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
