"""Deleting stored instances: by request (DICOMweb DELETE, ``dicomflow delete``), by rejection note, by retention.

Where it runs: in the process that is asked (the web service, the CLI, the store for a rejection note),
through :func:`.execute.delete`, over the catalogue and the backends every service already opens. No
service imports another, and no request has to travel the bus to a store member and back. The catalogue
rows go first (one transaction, which also says which bytes another instance still holds), then the
objects nobody else holds, then one ``dicom.deleted`` event per instance. A failure before the transaction
commits changes nothing and can be retried (a redelivered rejection note is); after it, the deletion
stands: objects or events that did not follow are reported (an orphan object is space, never data that
is served), and a retry finds nothing left to delete.
The decisions (which objects go, which studies retention takes, what a rejection note names) are the
pure functions of :mod:`.plan`, :mod:`.retention` and :mod:`.rejection`.
"""
