"""Signing keys, JWKS, agent token issuing and verification, IdP tokens, DPoP proofs."""
