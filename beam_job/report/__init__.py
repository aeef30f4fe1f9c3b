"""Static HTML reports: a page per extraction run (`run.py`) and pages of retrieval results (`retrieval.py`)."""
