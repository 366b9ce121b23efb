"""Training: one loop (`loop.train`) driven by pluggable objectives (`objectives.OBJECTIVES`)."""
