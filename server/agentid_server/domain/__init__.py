"""Pure domain logic: scopes, delegation, decisions, revocation set. No I/O, no gRPC, no SQL."""
