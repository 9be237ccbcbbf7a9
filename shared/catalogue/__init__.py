"""The catalogue: what is stored, per tenant, at patient, study, series and instance level, and how to find it."""
