"""DICOM C-STORE SCP: durable bytes (claim-check), then a JetStream event, then success."""
