"""The Beam job: inputs, pre-processing, RunInference with our model handler, Parquet outputs. Never imports TensorFlow."""
