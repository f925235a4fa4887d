"""Built-in examples on data that ships offline (sklearn's digits)."""
