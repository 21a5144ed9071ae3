"""Edit metrics (CounterFact, token accuracy) and model-health metrics."""
