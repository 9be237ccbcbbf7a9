"""dicomflow: receive DICOM, route whole studies, store them per institution policy."""

__version__ = "0.1.0"
