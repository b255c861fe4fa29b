"""Text to training batches: the embedded corpus, the sentencepiece tokenizer, token files
and the batch loaders. Later work adds ``hylas data prepare`` for user corpora."""
