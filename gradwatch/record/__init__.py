"""Record: the rows of every step (columns, summaries, the column store) and where they go (CSV, stdout, TensorBoard)."""
