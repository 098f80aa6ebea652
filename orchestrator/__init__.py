"""The Ray and MLflow side: config schema, cluster, trainer, sweep, SEA pool, tracking."""
