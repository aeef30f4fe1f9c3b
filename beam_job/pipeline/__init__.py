"""The Beam job: inputs, pre-processing, RunInference with our handler, Parquet outputs. Never imports TensorFlow."""
