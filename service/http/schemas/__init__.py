"""Request and response models of the REST API (Qdrant-shaped), one module per resource:

  common       ids, vectors, payloads, strictness, Qdrant's metric names
  filters      Qdrant's filter language
  collections  create, train, payload indexes
  points       upsert, delete, count, retrieve, scroll, payload operations
  search       search, query, recommend
  responses    the envelope and Qdrant's result shapes

`from service.http import schemas` gives every model by name (schemas.SearchRequest).
"""

from .collections import *  # noqa: F401,F403
from .common import *  # noqa: F401,F403
from .common import parse_path_id  # noqa: F401
from .filters import *  # noqa: F401,F403
from .points import *  # noqa: F401,F403
from .responses import *  # noqa: F401,F403
from .search import *  # noqa: F401,F403
