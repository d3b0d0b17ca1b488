"""The HTTP door (docs/http.md): an adapter over the domain objects the gRPC servicer uses.
It never touches storage or the gRPC layer (import-linter: "web never touches storage")."""
