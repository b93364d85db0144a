"""Out-of-distribution detection for a model version's inputs (DESIGN: "Out-of-distribution").

`profile` summarises a version's training data once, offline (`canary-gateway profile`); `scoring`
scores each request's rows against it on the request path (Mahalanobis distance, with the features
most responsible); `drift` compares a window of recent traffic with it (PSI, KS) and raises an alert.
"""
