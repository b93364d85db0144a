"""Ground truth joined to logged predictions: the feedback store, its ingest, quality and fairness reports."""
