"""Text to training batches: sources (``sources``), the sentencepiece tokenizer with its
Hugging Face files (``tokenizer``), token shards (``prepare``, ``dataset``) and the packed
loader (``loader``)."""
