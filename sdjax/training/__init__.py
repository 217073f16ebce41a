"""Training: the optimiser and data-parallel steps (train), the captioned-shapes data (shapes)
and the built-in model's recipe (recipe). None of this is needed for inference."""
