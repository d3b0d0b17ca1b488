"""The gRPC edge: method policy, caller authentication, proto <-> domain, errors -> status."""
