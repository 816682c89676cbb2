"""From a profile to a Pareto front of per-layer plans and one chosen plan (``kvtune search``).
Needs no model until it verifies."""

from kvtune.search.budget import Budget, BudgetError, parse_budget
from kvtune.search.search import SearchResult, SearchSettings, run_search

__all__ = ["Budget", "BudgetError", "SearchResult", "SearchSettings", "parse_budget", "run_search"]
