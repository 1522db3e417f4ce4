"""Load: the user's model (SavedModel, .keras) and data (npz, csv, TFRecord, text, tf.data) from disk, checked against each other."""
