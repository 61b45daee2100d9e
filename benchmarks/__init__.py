"""Side-by-side benchmarks: moeshard's offloading modes against transformers and accelerate, in one run."""
