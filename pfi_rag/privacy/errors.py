"""The privacy package's exceptions, in one place so callers can catch them by kind."""

from __future__ import annotations


class PrivacyError(ValueError):
    """A privacy setting or request that cannot be honoured; the message says what to change."""


class BudgetExceeded(PrivacyError):
    """A training call would take a client past its privacy budget; nothing was trained or written."""

    def __init__(self, message: str, *, epsilon_spent: float, epsilon_max: float, requested: float):
        super().__init__(message)
        self.epsilon_spent = epsilon_spent
        self.epsilon_max = epsilon_max
        self.requested = requested

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_max - self.epsilon_spent)
