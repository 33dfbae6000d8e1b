"""Generated contract documents (JSON Schema per message, AsyncAPI 3 for the bus)."""

from ._docs import ASYNCAPI_VERSION, CONTRACT_VERSION, asyncapi, json_schemas

__all__ = ["ASYNCAPI_VERSION", "CONTRACT_VERSION", "asyncapi", "json_schemas"]
