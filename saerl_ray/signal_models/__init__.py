"""The paper's three operations as plain numpy/scikit-learn models: kmeans (diversity), difficulty (the
ElasticNet/ridge proxy), quality (the probe and its unsupervised signals), with the synthetic negatives in
corruptions. No Ray, no files: the signals stage wraps them."""
