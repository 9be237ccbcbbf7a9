"""The read side's parts on the DICOMweb application: the catalogue it answers from, the object stores it reads."""

from aiohttp import web

from shared.catalogue.sql import SqlCatalogue
from shared.storage.objectstore import Backends

CATALOGUE = web.AppKey("catalogue", SqlCatalogue)
BACKENDS = web.AppKey("backends", Backends)
