"""The dicomflow services: ingest, router, store, autoscaler. No service imports another."""
