"""The DICOMweb HTTP shell every web-facing service mounts its resources on: auth, CORS, metrics, errors."""
