"""Report: the tables, verdicts, sparklines and plots of recorded rows; reads them, never changes them, never imports TensorFlow."""
