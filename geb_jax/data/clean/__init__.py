"""Pretraining-data cleaning chain (GEB-1.3B / LLaMA style): rules, quality, code, language,
perplexity and dedup filters, run by `clean(documents, config) -> (kept documents, Report)`.

Modules: rules (HTML, garbled text, PII, incomplete lines, spam words), quality (Gopher and C4
English heuristics), code (GitHub-file heuristics, licence headers), lang (zh/en/code
identification), perplexity (scorer protocol, n-gram fallback, percentile/threshold filter),
model_scorer (bits per byte from a model trained with geb_jax: perplexity_model="model:<path>"),
dedup (repeated sentences, repeated paragraphs, MinHash-LSH near duplicates), chain (config,
runner, report). `python -m geb_jax.data.prepare` runs it from the command line. docs/data.md,
section "Cleaning", documents every rule and its defaults.
"""
from geb_jax.data.clean.chain import (CleaningConfig, CleaningConfigError, FilterCounts, Report,
                                      build_steps, clean, default_cleaning_config)
from geb_jax.data.clean.perplexity import (CharNgramScorer, PerplexityScorer,
                                           builtin_ngram_scorer, scorer_from_callable)

__all__ = ["CharNgramScorer", "CleaningConfig", "CleaningConfigError", "FilterCounts",
           "PerplexityScorer", "Report", "build_steps", "builtin_ngram_scorer", "clean",
           "default_cleaning_config", "scorer_from_callable"]
