"""What the dicomflow services share: event schemas, subjects, partitioning, config, telemetry, the bus runtime."""
