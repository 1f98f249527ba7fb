"""Evaluation: needle recall by context length and depth, key-value recall, perplexity; base vs retrofit."""

from .runner import compare, evaluate_ppl, evaluate_recall, memory_off, score_case, summary_table
from .tasks import Templates, make_case, parse_length

__all__ = ['Templates', 'compare', 'evaluate_ppl', 'evaluate_recall', 'make_case', 'memory_off', 'parse_length',
           'score_case', 'summary_table']
