"""The Beam job: inputs, pre-processing, RunInference with our handler, Parquet outputs. Never imports TensorFlow."""

METRICS_NAMESPACE = "delg"  # Beam metrics namespace of every counter and distribution the job reports
