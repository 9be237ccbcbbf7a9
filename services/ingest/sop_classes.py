"""Which abstract syntaxes the SCP takes as storage, the same for both engines. Pure.

pynetdicom's storage list (``AllStoragePresentationContexts``) leaves out the retired storage SOP
classes (Ultrasound Image Storage (Retired), Nuclear Medicine Image Storage (Retired), the standalone
curves and overlays, the SR trials, ...) and some newer ones (DICOS, eddy current, inventory), which
old modalities and archives still send and dcmtk's storescp accepts. Here the standard storage
classes are pynetdicom's plus every storage SOP class of pydicom's UID dictionary, retired or not.

Beyond the standard, ``ingest.private_sop_classes`` names the private ones a site's modalities use
(a vendor's UID, e.g. Siemens CSA Non-Image 1.3.12.2.1107.5.9.1), or is ``any``: every abstract
syntax that is not a known non-storage SOP class is taken as storage - pynetdicom's
``UNRESTRICTED_STORAGE_SERVICE`` rule (private, a storage class, or unknown to pynetdicom), so the
lean engine's ``any`` and pynetdicom's accept the same contexts. The rule goes by pynetdicom's names, so
a standard class it names otherwise than pydicom (Modality Worklist FIND) is taken as storage too; a
C-FIND on it is answered "unrecognized operation".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, sop_class
from pynetdicom.sop_class import _STORAGE_CLASSES

ANY = "any"
ALL_TS = frozenset(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

# Named "... Storage" in the dictionary but no C-STORE of an instance: DICOMDIR, storage commitment.
_NOT_INSTANCE_STORAGE = ("Media Storage Directory Storage", "Storage Commitment")


def _dictionary_storage_classes() -> frozenset[str]:
    out = set()
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and "Storage" in name and not name.startswith(_NOT_INSTANCE_STORAGE):
            out.add(uid)
    return frozenset(out)


STANDARD_STORAGE: frozenset[str] = frozenset(_STORAGE_CLASSES.values()) | _dictionary_storage_classes()
"""Every standard storage SOP class, retired ones included."""

BEYOND_PYNETDICOM: frozenset[str] = STANDARD_STORAGE - frozenset(_STORAGE_CLASSES.values())
"""The storage classes pynetdicom does not list (retired and some newer ones)."""


def storage_like(abstract_syntax: str) -> bool:
    """Whether ``any`` takes ``abstract_syntax`` as storage: a private UID, a storage class, or a UID that
    names no SOP class pynetdicom knows (the test of pynetdicom's ``negotiate_unrestricted``)."""
    uid = UID(abstract_syntax)
    return uid.is_private or abstract_syntax in STANDARD_STORAGE or not hasattr(sop_class, uid.keyword)


def private_classes(setting: list[str] | tuple[str, ...] | str) -> tuple[frozenset[str], bool]:
    """(the listed private storage classes, whether every storage-like abstract syntax is accepted)."""
    if setting == ANY:
        return frozenset(), True
    return frozenset(setting), False


class StorageContexts(Mapping[str, frozenset[str]]):
    """Abstract syntax -> the transfer syntaxes the SCP accepts for it: the ``known`` contexts (storage,
    verification, query/retrieve), and with ``accept_any`` every other storage-like abstract syntax in
    every transfer syntax (what :func:`services.ingest.pdu.negotiate` looks up)."""

    def __init__(self, known: Mapping[str, frozenset[str]], accept_any: bool):
        self.known = dict(known)
        self.accept_any = accept_any

    def __getitem__(self, abstract_syntax: str) -> frozenset[str]:
        ours = self.known.get(abstract_syntax)
        if ours is not None:
            return ours
        if self.accept_any and abstract_syntax and storage_like(abstract_syntax):
            return ALL_TS
        raise KeyError(abstract_syntax)

    def __iter__(self) -> Iterator[str]:
        return iter(self.known)

    def __len__(self) -> int:
        return len(self.known)


def storage_contexts(private: list[str] | tuple[str, ...] | str, extra: Mapping[str, frozenset[str]] | None = None) -> StorageContexts:
    """The lean engine's supported contexts: every standard storage class and the listed private ones in
    every transfer syntax, plus ``extra`` (verification, query/retrieve), and, with ``any``, the rest."""
    listed, accept_any = private_classes(private)
    known = {uid: ALL_TS for uid in STANDARD_STORAGE | listed}
    known.update(extra or {})
    return StorageContexts(known, accept_any)
