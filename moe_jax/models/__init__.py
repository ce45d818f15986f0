"""Models: the T5-style (sparse) encoder-decoder, its t5x-shaped wrapper, decoding."""
