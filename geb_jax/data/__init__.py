"""Data: the built-in bilingual corpus (corpus.py) and the SentencePiece tokenizer (tokenizer.py)."""
