"""DELG core: our Keras DELG, exporters, model loading and the extractor. Imports TensorFlow, never Beam."""
