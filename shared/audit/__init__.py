"""The audit trail: PS3.15 audit records built from plain facts, kept in DICOM_AUDIT, forwarded to syslog."""
