"""Deleting stored instances: by request (DICOMweb DELETE, ``dicomflow delete``), by rejection note, by retention.

Where it runs: in the process that is asked (the web service, the CLI, the store for a rejection note),
through :func:`.execute.delete`, over the catalogue and the backends every service already opens. No
service imports another, and no request has to travel the bus to a store member and back. Each step
is idempotent, so a retry (a redelivered rejection note, an operator running the command again) finishes
what a crash left: the catalogue rows go first (one transaction, which also says which bytes another
instance still holds), then the objects nobody else holds, then one ``dicom.deleted`` event per instance.
The decisions (which objects go, which studies retention takes, what a rejection note names) are the
pure functions of :mod:`.plan`, :mod:`.retention` and :mod:`.rejection`.
"""
